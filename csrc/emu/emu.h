// A small CPU emulator of the CUDA features csrc/decode.cu uses, for testing its kernels on a
// machine without a GPU (tests/test_cuda_ext.py). Thread blocks run one after another; the
// threads of a block run as fibers (ucontext) with barriers for __syncthreads() and for the
// warp-synchronous shuffles/ballots (every lane of a warp must take part, as the kernels
// guarantee with full masks). __shared__ variables become function statics, which is sound
// because only one block runs at a time. Test-only: C++20, Linux, never part of the build.
#pragma once

#include <ucontext.h>

#include <cstdio>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// CUDA's alignments: with -fsanitize=alignment a misaligned vector access aborts, as on a GPU.
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }

struct __half { _Float16 v; };
struct alignas(4) __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

namespace emu {

// The threads of a block are fibers (ucontext) run by one OS thread: a fiber runs until it
// reaches a barrier (block or warp) or returns; a barrier opens when every live thread of its
// block (warp) waits at it. A barrier that can never open (divergent __syncthreads, a shuffle
// not reached by every lane) aborts. Blocks run one after another.
enum FiberState { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Block;
inline Block* cur_block = nullptr;

struct Block {
  explicit Block(int n) : nthreads(n), nwarps((n + 31) / 32) {
    ctx.resize(static_cast<size_t>(n));
    state.resize(static_cast<size_t>(n));
    stacks.resize(static_cast<size_t>(n));
    for (auto& st : stacks) st.reset(new char[kStack]);  // uninitialised: cheap
    shfl.resize(static_cast<size_t>(n));
    warp_waiting.resize(static_cast<size_t>(nwarps));
    warp_live.resize(static_cast<size_t>(nwarps));
  }
  static constexpr size_t kStack = 64 * 1024;
  int nthreads, nwarps;
  int current = 0;
  int live = 0, block_waiting = 0;
  std::vector<int> warp_waiting, warp_live;
  std::vector<ucontext_t> ctx;
  std::vector<FiberState> state;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<uint64_t> shfl;
  int flag = 0;
  std::vector<unsigned char> dyn_smem;
};

inline dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline int sm_count_value = 8;

inline void* dyn_smem() { return cur_block->dyn_smem.data(); }

inline void fiber_entry() {
  Block* b = cur_block;
  b->body(b->body_arg);
  b->state[static_cast<size_t>(b->current)] = kDone;
  --b->live;
  --b->warp_live[static_cast<size_t>(b->current / 32)];
  // returning resumes b->sched through uc_link
}

inline void yield_to_scheduler() {
  Block* b = cur_block;
  swapcontext(&b->ctx[static_cast<size_t>(b->current)], &b->sched);
}

inline void block_barrier() {
  Block* b = cur_block;
  b->state[static_cast<size_t>(b->current)] = kWaitBlock;
  ++b->block_waiting;
  yield_to_scheduler();
}

inline void warp_barrier() {
  Block* b = cur_block;
  b->state[static_cast<size_t>(b->current)] = kWaitWarp;
  ++b->warp_waiting[static_cast<size_t>(b->current / 32)];
  yield_to_scheduler();
}

inline void run_block(Block& b) {
  cur_block = &b;
  b.live = b.nthreads;
  b.block_waiting = 0;
  for (int w = 0; w < b.nwarps; ++w) {
    b.warp_waiting[static_cast<size_t>(w)] = 0;
    b.warp_live[static_cast<size_t>(w)] = b.nthreads - w * 32 < 32 ? b.nthreads - w * 32 : 32;
  }
  for (int t = 0; t < b.nthreads; ++t) {
    auto& c = b.ctx[static_cast<size_t>(t)];
    getcontext(&c);
    c.uc_stack.ss_sp = b.stacks[static_cast<size_t>(t)].get();
    c.uc_stack.ss_size = Block::kStack;
    c.uc_link = &b.sched;
    makecontext(&c, fiber_entry, 0);
    b.state[static_cast<size_t>(t)] = kRunnable;
  }
  while (b.live > 0) {
    bool ran = false;
    for (int t = 0; t < b.nthreads; ++t) {
      if (b.state[static_cast<size_t>(t)] != kRunnable) continue;
      b.current = t;
      tl_threadIdx = dim3(static_cast<unsigned>(t));
      swapcontext(&b.sched, &b.ctx[static_cast<size_t>(t)]);
      ran = true;
    }
    bool released = false;
    for (int w = 0; w < b.nwarps; ++w) {
      const size_t wi = static_cast<size_t>(w);
      if (b.warp_waiting[wi] > 0 && b.warp_waiting[wi] == b.warp_live[wi]) {
        for (int t = w * 32; t < w * 32 + 32 && t < b.nthreads; ++t) {
          if (b.state[static_cast<size_t>(t)] == kWaitWarp) b.state[static_cast<size_t>(t)] = kRunnable;
        }
        b.warp_waiting[wi] = 0;
        released = true;
      }
    }
    if (b.block_waiting > 0 && b.block_waiting == b.live) {
      for (int t = 0; t < b.nthreads; ++t) {
        if (b.state[static_cast<size_t>(t)] == kWaitBlock) b.state[static_cast<size_t>(t)] = kRunnable;
      }
      b.block_waiting = 0;
      released = true;
    }
    if (!ran && !released && b.live > 0) {
      std::fprintf(stderr, "emu: deadlock: a barrier not reached by every live thread\n");
      std::abort();
    }
  }
  cur_block = nullptr;
}

template <typename F>
void launch(F fn, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  Block blk(n);
  blk.body = [](void* f) { (*static_cast<F*>(f))(); };
  blk.body_arg = &fn;
  tl_blockDim = block;
  tl_gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        tl_blockIdx = dim3(bx, by, bz);
        blk.dyn_smem.assign(smem + 16, 0xCD);  // poison: unwritten shared memory shows
        run_block(blk);
      }
}

inline int lane_id() { return static_cast<int>(tl_threadIdx.x % 32); }
inline int warp_base() { return static_cast<int>(tl_threadIdx.x / 32 * 32); }
inline void warp_sync() { warp_barrier(); }

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  cur_block->shfl[tl_threadIdx.x] = bits;
  warp_sync();
  const uint64_t got = cur_block->shfl[static_cast<size_t>(warp_base() + src_lane)];
  warp_sync();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

}  // namespace emu

#define threadIdx (emu::tl_threadIdx)
#define blockIdx (emu::tl_blockIdx)
#define blockDim (emu::tl_blockDim)
#define gridDim (emu::tl_gridDim)

inline void __syncthreads() { emu::block_barrier(); }
inline int __syncthreads_or(int pred) {
  emu::Block* b = emu::cur_block;
  emu::block_barrier();
  if (pred) b->flag = 1;
  emu::block_barrier();
  const int r = b->flag;
  emu::block_barrier();
  if (threadIdx.x == 0) b->flag = 0;
  return r;
}
template <typename T> T __shfl_xor_sync(unsigned, T v, int k) {
  return emu::exchange(v, emu::lane_id() ^ k);
}
template <typename T> T __shfl_down_sync(unsigned, T v, int k) {
  const int src = emu::lane_id() + k;
  const T r = emu::exchange(v, src < 32 ? src : emu::lane_id());
  return r;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  emu::Block* b = emu::cur_block;
  b->shfl[threadIdx.x] = pred ? 1u : 0u;
  emu::warp_sync();
  unsigned r = 0;
  const int base = emu::warp_base();
  for (int l = 0; l < 32 && base + l < b->nthreads; ++l) r |= b->shfl[base + l] ? (1u << l) : 0u;
  emu::warp_sync();
  return r;
}
template <typename T> T atomicAdd(T* p, T v) {  // fibers: no two run at once
  const T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::sm_count_value;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

