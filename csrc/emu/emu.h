// A small CPU emulator of the CUDA features csrc/decode.cu uses, for testing its kernels on a
// machine without a GPU (tests/test_cuda_ext.py). Thread blocks run one after another; the
// threads of a block run as std::threads, with std::barrier for __syncthreads() and for the
// warp-synchronous shuffles/ballots (every lane of a warp must take part, as the kernels
// guarantee with full masks). __shared__ variables become function statics, which is sound
// because only one block runs at a time. Test-only: C++20, slow, never part of the build.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
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

struct Block {
  explicit Block(int n) : nthreads(n), bar(n) {
    for (int w = 0; w * 32 < n; ++w) {
      const int lanes = n - w * 32 < 32 ? n - w * 32 : 32;
      warps.emplace_back(std::make_unique<std::barrier<>>(lanes));
    }
    shfl.resize(static_cast<size_t>(n));
  }
  int nthreads;
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> shfl;
  std::atomic<int> flag{0};
  std::vector<unsigned char> dyn_smem;
};

inline thread_local dim3 tl_threadIdx, tl_blockIdx, tl_blockDim, tl_gridDim;
inline thread_local Block* tl_block = nullptr;
inline int sm_count_value = 8;

inline void* dyn_smem() { return tl_block->dyn_smem.data(); }

// One std::thread per CUDA thread of a block, reused for every block of the grid in turn; a
// block barrier separates blocks. Sound for kernels whose early returns are uniform over the
// block or, in kernels without __syncthreads, over the warp (decode.cu's are).
template <typename F>
void launch(F fn, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  Block blk(n);
  blk.dyn_smem.assign(smem + 16, 0xCD);  // poison: unwritten shared memory shows
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int tid = 0; tid < n; ++tid) {
    threads.emplace_back([&, tid] {
      tl_threadIdx = dim3(static_cast<unsigned>(tid));
      tl_blockDim = block;
      tl_gridDim = grid;
      tl_block = &blk;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            tl_blockIdx = dim3(bx, by, bz);
            fn();
            blk.warps[static_cast<size_t>(tid / 32)]->arrive_and_wait();
            blk.bar.arrive_and_wait();
            if (tid == 0) std::memset(blk.dyn_smem.data(), 0xCD, blk.dyn_smem.size());
            blk.bar.arrive_and_wait();
          }
    });
  }
  for (auto& t : threads) t.join();
}

inline int lane_id() { return static_cast<int>(tl_threadIdx.x % 32); }
inline int warp_base() { return static_cast<int>(tl_threadIdx.x / 32 * 32); }
inline void warp_sync() { tl_block->warps[tl_threadIdx.x / 32]->arrive_and_wait(); }

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  tl_block->shfl[tl_threadIdx.x] = bits;
  warp_sync();
  const uint64_t got = tl_block->shfl[static_cast<size_t>(warp_base() + src_lane)];
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

inline void __syncthreads() { emu::tl_block->bar.arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  emu::Block* b = emu::tl_block;
  b->bar.arrive_and_wait();
  if (pred) b->flag.store(1);
  b->bar.arrive_and_wait();
  const int r = b->flag.load();
  b->bar.arrive_and_wait();
  if (threadIdx.x == 0) b->flag.store(0);
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
  emu::Block* b = emu::tl_block;
  b->shfl[threadIdx.x] = pred ? 1u : 0u;
  emu::warp_sync();
  unsigned r = 0;
  const int base = emu::warp_base();
  for (int l = 0; l < 32 && base + l < b->nthreads; ++l) r |= b->shfl[base + l] ? (1u << l) : 0u;
  emu::warp_sync();
  return r;
}
template <typename T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::sm_count_value;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }

