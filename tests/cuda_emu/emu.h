// A small CPU emulator of the CUDA features csrc/decode.cu uses, for testing its kernels on a
// machine without a GPU (tests/test_cuda_ext.py). Test-only: C++20, Linux; setup.py never sees
// it (it compiles csrc/*.cu and csrc/*.cpp only).
//
// The seam: csrc/*.cu launches kernels with SFNN_LAUNCH(kernel, grid, block, smem, stream)(args)
// and declares its shared memory with SFNN_DYNAMIC_SMEM(type, name); both are defined here, so
// the real source compiles unchanged with g++ (decode_emu.cpp includes it after this header).
// Static __shared__ variables are not emulated (each block's shared memory is its dynamic buffer)
// and are a compile error.
//
// Execution: every CUDA thread is a fiber run by one OS thread (started with ucontext, switched
// with _setjmp/_longjmp, which skip the signal-mask system calls of swapcontext: build with
// -U_FORTIFY_SOURCE, whose longjmp check rejects jumps between stacks). A fiber runs until it
// reaches a barrier (__syncthreads, or a warp shuffle/ballot, which every lane of the warp must
// reach, as the kernels guarantee with full masks), spins (__nanosleep) or returns; a barrier
// opens when every live thread of its block (warp) waits at it. Up to `resident_blocks` thread
// blocks are resident at once, started in blockIdx order as earlier ones finish and interleaved
// fiber by fiber, like blocks sharing a GPU; 1 runs them one after another. A launch fails (the
// next cudaGetLastError returns an error, and cudaGetErrorString says why) when a barrier can
// never open (divergent __syncthreads) or every resident block only spins (a wait on a block
// that cannot start), and when its configuration would fail on a GPU: more than 1024 threads,
// grid dimensions past 2^31-1 (x) or 65535 (y, z), more than 48 KiB of dynamic shared memory.
// Memory is sequentially consistent here, so fences are no-ops: memory-model bugs are for a GPU
// run (compute-sanitizer) to find; ordering bugs between blocks (a missing wait) show up when
// blocks interleave.
//
// initcheck: with `initcheck` on, every __ldcg (the loads decode.cu uses for data another block
// wrote in the same launch) that returns a 32-bit word equal to `poison32` counts a violation:
// tests fill workspaces with that pattern, so a read of a word the kernels never wrote shows.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
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
enum {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 4,
  cudaErrorLaunchTimeout = 6,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static_shared_memory_is_not_emulated__use_SFNN_DYNAMIC_SMEM

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

enum FiberState { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Block;
inline Block* cur_block = nullptr;

struct JmpBuf {
  jmp_buf buf;
};

// One resident thread block: its fibers (stacks reused by the blocks that follow in its slot),
// barrier bookkeeping and dynamic shared memory.
struct Block {
  explicit Block(int n) : nthreads(n), nwarps((n + 31) / 32) {
    ctx.resize(static_cast<size_t>(n));
    jmp.resize(static_cast<size_t>(n));
    started.resize(static_cast<size_t>(n));
    state.resize(static_cast<size_t>(n));
    getcontext(&ctx_template);
    stacks.resize(static_cast<size_t>(n));
    for (auto& st : stacks) st.reset(new char[kStack]);  // uninitialised: cheap
    shfl.resize(static_cast<size_t>(n));
    warp_waiting.resize(static_cast<size_t>(nwarps));
    warp_live.resize(static_cast<size_t>(nwarps));
  }
  static constexpr size_t kStack = 64 * 1024;
  int nthreads, nwarps;
  dim3 idx;
  bool active = false;
  int current = 0;
  int live = 0, block_waiting = 0;
  bool spun = false;  // the fiber that just yielded did so in a spin
  std::vector<int> warp_waiting, warp_live;
  std::vector<ucontext_t> ctx;  // a fiber's start
  std::vector<JmpBuf> jmp;      // where a started fiber resumes
  std::vector<char> started;
  ucontext_t ctx_template;
  JmpBuf sched;                 // where the scheduler resumes
  std::vector<FiberState> state;
  std::vector<std::unique_ptr<char[]>> stacks;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<uint64_t> shfl;
  int flag = 0;
  std::vector<unsigned char> dyn_smem;
};

inline dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline int sm_count_value = 8;
inline int resident_blocks = 1;
inline bool dry_run = false;  // validate launches, run nothing
inline bool initcheck = false;
inline constexpr uint32_t poison32 = 0xCDCDCDCDu;
inline long initcheck_violations = 0;
inline cudaError_t last_error = cudaSuccess;
inline std::string error_text;
inline unsigned long long last_launch[3] = {0, 0, 0};  // blocks, threads per block, smem bytes
inline constexpr long kMaxIdleRounds = 100000;

inline void* dyn_smem() { return cur_block->dyn_smem.data(); }

inline void set_error(cudaError_t err, const std::string& text) {
  last_error = err;
  error_text = text;
}

inline void fiber_entry() {
  Block* b = cur_block;
  b->body(b->body_arg);
  b = cur_block;
  b->state[static_cast<size_t>(b->current)] = kDone;
  --b->live;
  --b->warp_live[static_cast<size_t>(b->current / 32)];
  _longjmp(b->sched.buf, 1);  // never returns: the stack is reused by the slot's next block
}

inline void yield_to_scheduler() {
  Block* b = cur_block;
  if (_setjmp(b->jmp[static_cast<size_t>(b->current)].buf) == 0) _longjmp(b->sched.buf, 1);
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

inline void spin() {
  cur_block->spun = true;
  yield_to_scheduler();
}

inline void start_block(Block& b, dim3 idx, size_t smem) {
  b.idx = idx;
  b.active = true;
  b.live = b.nthreads;
  b.block_waiting = 0;
  b.flag = 0;
  for (int w = 0; w < b.nwarps; ++w) {
    b.warp_waiting[static_cast<size_t>(w)] = 0;
    b.warp_live[static_cast<size_t>(w)] = b.nthreads - w * 32 < 32 ? b.nthreads - w * 32 : 32;
  }
  for (int t = 0; t < b.nthreads; ++t) {
    auto& c = b.ctx[static_cast<size_t>(t)];
    c = b.ctx_template;
    c.uc_stack.ss_sp = b.stacks[static_cast<size_t>(t)].get();
    c.uc_stack.ss_size = Block::kStack;
    c.uc_link = nullptr;
    makecontext(&c, fiber_entry, 0);
    b.started[static_cast<size_t>(t)] = 0;
    b.state[static_cast<size_t>(t)] = kRunnable;
  }
  b.dyn_smem.assign(smem + 16, 0xCD);  // poison: unwritten shared memory shows
}

// One round of a resident block: every runnable fiber runs until it yields, then the barriers
// that every live thread reached open. Returns 1 if anything but spinning happened, 0 if not,
// -1 if the block can never go on (a barrier not reached by every live thread).
inline int step_block(Block& b) {
  cur_block = &b;
  tl_blockIdx = b.idx;
  bool ran = false, progress = false;
  for (int t = 0; t < b.nthreads; ++t) {
    if (b.state[static_cast<size_t>(t)] != kRunnable) continue;
    b.current = t;
    b.spun = false;
    tl_threadIdx = dim3(static_cast<unsigned>(t));
    if (_setjmp(b.sched.buf) == 0) {
      if (b.started[static_cast<size_t>(t)]) _longjmp(b.jmp[static_cast<size_t>(t)].buf, 1);
      b.started[static_cast<size_t>(t)] = 1;
      setcontext(&b.ctx[static_cast<size_t>(t)]);
    }
    cur_block = &b;
    ran = true;
    progress |= !b.spun;
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
  cur_block = nullptr;
  if (b.live == 0) {
    b.active = false;
    return 1;
  }
  if (!ran && !released) return -1;
  return progress || released ? 1 : 0;
}

inline std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

template <typename F>
void launch(F fn, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 ||
      grid.y > 65535 || grid.z == 0 || grid.z > 65535 || smem > 48 * 1024) {
    set_error(cudaErrorInvalidValue, "invalid argument (emulated launch of grid " + dims(grid) +
                                         ", block " + dims(block) + ", " + std::to_string(smem) +
                                         " bytes of dynamic shared memory)");
    return;
  }
  const unsigned long long total = 1ull * grid.x * grid.y * grid.z;
  last_launch[0] = total;
  last_launch[1] = threads;
  last_launch[2] = smem;
  if (dry_run) return;
  tl_blockDim = block;
  tl_gridDim = grid;
  const int n_slots = resident_blocks < 1 ? 1 : resident_blocks;
  std::vector<std::unique_ptr<Block>> slots(static_cast<size_t>(n_slots));
  unsigned long long next = 0;
  long idle = 0;
  while (true) {
    bool any = false;
    for (auto& s : slots) {
      if ((!s || !s->active) && next < total) {
        if (!s) {
          s = std::make_unique<Block>(static_cast<int>(threads));
          s->body = [](void* f) { (*static_cast<F*>(f))(); };
          s->body_arg = &fn;
        }
        const unsigned long long i = next++;
        start_block(*s, dim3(static_cast<unsigned>(i % grid.x),
                             static_cast<unsigned>(i / grid.x % grid.y),
                             static_cast<unsigned>(i / grid.x / grid.y)), smem);
      }
      any |= s && s->active;
    }
    if (!any) break;
    bool progress = false;
    for (auto& s : slots) {
      if (!s || !s->active) continue;
      const int r = step_block(*s);
      if (r < 0) {
        set_error(cudaErrorLaunchFailure,
                  "emulated deadlock: a __syncthreads or warp barrier of block " + dims(s->idx) +
                      " is not reached by every live thread");
        return;  // the suspended fibers are dropped with their stacks
      }
      progress |= r > 0;
    }
    idle = progress ? 0 : idle + 1;
    if (idle > kMaxIdleRounds) {
      set_error(cudaErrorLaunchTimeout,
                "emulated deadlock: every resident block (" + std::to_string(n_slots) +
                    ") spins, waiting for a block that cannot start or finish");
      return;
    }
  }
}

// SFNN_LAUNCH(kernel, grid, block, smem, stream)(args...)
template <typename K>
struct Launcher {
  K kernel;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... A>
  void operator()(A... args) const {
    const K k = kernel;
    launch([=]() { k(args...); }, grid, block, smem, stream);
  }
};

template <typename K>
Launcher<K> make_launcher(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
  return Launcher<K>{kernel, grid, block, smem, stream};
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

inline void check_init(const void* p, size_t bytes) {
  if (!initcheck) return;
  for (size_t i = 0; i + 4 <= bytes; i += 4) {
    uint32_t w;
    std::memcpy(&w, static_cast<const char*>(p) + i, 4);
    if (w == poison32) ++initcheck_violations;
  }
}

}  // namespace emu

#define SFNN_LAUNCH(kernel, grid, block, smem, stream) \
  ::emu::make_launcher(kernel, dim3(grid), dim3(block), smem, stream)
#define SFNN_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dyn_smem())

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
// L2-only load (data written by another block of the launch): counted by initcheck.
template <typename T> T __ldcg(const T* p) {
  const T v = *p;
  emu::check_init(&v, sizeof(T));
  return v;
}
inline void __threadfence() {}  // memory is sequentially consistent here
inline void __nanosleep(unsigned) { emu::spin(); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::sm_count_value;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  return emu::error_text.empty() ? "emulated error" : emu::error_text.c_str();
}
