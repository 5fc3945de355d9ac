// Decoding kernels for the Avg-K block-sparse FFN (1-15 tokens per step): plain CUDA, no torch.
//
// Decoding is memory-bound, so the work is built around reading each byte of weights once, with
// 16-byte vector loads, and doing the arithmetic in fp32 from registers. Partial sums are combined
// in a fixed order: results are bitwise deterministic run to run (no float atomics), whatever the
// order in which thread blocks run.
//
// One kernel, decode_kernel, runs every call (select, ffn, or the whole step) in one launch. Its
// thread blocks take a ticket (an atomic counter) when they start and play the phase the ticket
// falls in, in this order:
//   S  scoring     x . kbar for a tile of 16 tokens, a slice of d_model, 16 kbar rows
//   K  top-K       one token's top_k blocks from its scores
//   F  block FFN   one (slot, row chunk): the selected block's key and value rows, once
//   C  combine     one (token, 128 columns) of y
// A phase that needs the previous one's results waits, in one thread, until the previous
// phase's "done" counter reaches its number of thread blocks (a release/acquire handshake:
// __threadfence before each arrival, after the wait). Tickets are handed out in the order thread
// blocks start, so a block only ever waits for blocks that started before it: these are
// resident or finished, and the wait cannot deadlock however many blocks the GPU holds at once.
// Results that another block wrote during the launch are read with __ldcg (L2, never a stale L1
// line or the read-only cache); the inputs are read through __ldg. The first 16 bytes of the
// workspace hold the counters; the launcher zeroes them with cudaMemsetAsync before the launch.
// A call is one memset and one kernel launch, so it can be captured in a CUDA graph.
//
// S: a warp owns 2 kbar rows; each lane reads 4 consecutive elements of both rows per step (16
//   bytes of fp32, 8 of bf16: kbar may be cached in bf16) and FMAs them against the same columns
//   of up to 16 tokens (x stays in L1), keeping 2 x 16 = 32 fp32 partial dot products. A reduce-scatter
//   butterfly (31 shuffles instead of 32 x 5) leaves lane l with the total of (row l/16, token
//   l%16). When kbar has too few rows to fill the GPU, d_model is cut into slices (>= 1024
//   columns each) whose partial scores go to an fp32 workspace (slices, T, n_blocks), summed in
//   slice order by K: deterministic, and kbar is still read once.
// K: each score becomes a 64-bit key, the order-preserving bits of the fp32 score above the
//   inverted block index, so keys are distinct and "larger key" means "larger score, then
//   smaller index" (NaN is made the canonical quiet NaN, which ranks above +inf as in
//   torch.sort; -0 is made +0). The top_k-th largest key is found by an MSD radix select, 8 bits
//   per pass: every thread adds its keys that still match the chosen prefix to a 256-bin
//   shared-memory histogram, then warp 0 finds the bin holding the k-th key with a warp suffix
//   scan (each lane owns 8 bins) and narrows the prefix; it stops as soon as that whole bin is
//   taken (usually 3-4 passes, at most 8). The top_k keys >= the threshold are gathered (shared
//   atomic counter, any order) and each is written at its rank among them: best first, exact.
// F: one thread block per (slot (t, j), row chunk). It works only if its slot is the first, in
//   row-major (t, j) order, to name its block, so each distinct selected block is processed by
//   exactly one block per chunk, which gathers the tokens that chose the block (with their summed
//   gates: a block chosen twice counts twice) and reads the block's key and value rows once for
//   all of them (groups of up to 8 tokens; a block chosen by more than 8 tokens re-reads its
//   rows, from L2). It also marks, for every slot naming its block, whether the slot is its
//   token's first to do so (a flag C reads instead of comparing indices).
//   Phase 1, keys: a warp per row; each lane reads 16 bytes of the key row per step and of each
//   listed token's x row, one fp32 dot product per token; a warp butterfly gives
//   h = gate * act(x . k + b) into shared memory (gated FFN: the warp then reads the gate row
//   the same way and h = gate * act(x . kg + bg) * (x . k + b)).
//   Phase 2, values: a thread per 16-byte column vector of the value rows, looping over the
//   chunk's rows, accumulating h * v for each listed token in fp32 registers (8 tokens x 8
//   columns). Each (token, block, chunk) partial row goes to an fp32 workspace row at the token's
//   first slot naming the block. Rows are split into chunks only when the step has too few slots
//   to fill the GPU (decoding one token: top_k slots for ~132 SMs).
// C: lane l of warp w owns columns 4l..4l+3 of a 128-column tile and sums the partials of the
//   token's flagged slots j = w, w + 8, ... over their chunks (16-byte loads; scalar loads for a
//   last vector that would cross d_model, so padding is never read); the 8 warp sums are added
//   in warp order, out_bias is added, and the result is cast to the input dtype. The partials
//   cost top_k * chunks * d_model * 8 bytes per token (written and read back, in L2 at decode
//   sizes), a few percent of the weight bytes.
// Vector loads need 16-byte aligned base pointers and row strides that are a multiple of the
// vector width; otherwise the launcher picks the scalar instantiation (VEC = false) of the
// kernel. A d_model that is not a multiple of the vector width is finished by scalar tail loops.
// Offsets that multiply a stride are int64.
//
// The emulator seam: every launch goes through SFNN_LAUNCH and the kernel's shared memory is one
// dynamic buffer declared with SFNN_DYNAMIC_SMEM (no static __shared__). The CPU emulator the
// tests use (tests/cuda_emu/) defines both before including this file; the real build takes the
// definitions below.

#include "decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>

#ifndef SFNN_LAUNCH
// SFNN_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...) launches kernel (a __global__
// function or a pointer to one).
#define SFNN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif
#ifndef SFNN_DYNAMIC_SMEM
// The kernel's dynamic shared memory as `type name[]`, 16-byte aligned.
#define SFNN_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

// ---------------------------------------------------------------------------------------------
// Element conversions and vector loads.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two 16-bit elements packed in a 32-bit word -> two floats (element 0 in the low half).
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi);
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}
template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t w, float& lo, float& hi) {
  __half2 h;
  memcpy(&h, &w, sizeof(h));
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

// Words of a VEC-element vector -> floats.
template <typename T, int VEC, int NWORDS>
__device__ __forceinline__ void unpack_words(const uint32_t (&w)[NWORDS], float (&out)[VEC]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) unpack2<T>(w[i], out[2 * i], out[2 * i + 1]);
  }
}

// VEC consecutive elements at p as floats, through the read-only data cache (inputs only).
// 4-, 8- and 16-byte vectors need p aligned to their size; 32 bytes are two 16-byte loads (p
// 16-byte aligned); VEC == 1 is a scalar load.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if constexpr (VEC == 1) {
    out[0] = to_float(__ldg(p));
  } else if constexpr (kBytes == 32) {
    constexpr int kHalf = VEC / 2;
    float lo[kHalf], hi[kHalf];
    load_vec<T, kHalf>(p, lo);
    load_vec<T, kHalf>(p + kHalf, hi);
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      out[i] = lo[i];
      out[kHalf + i] = hi[i];
    }
  } else if constexpr (kBytes == 16) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    unpack_words<T, VEC, 4>(w, out);
  } else if constexpr (kBytes == 8) {
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {r.x, r.y};
    unpack_words<T, VEC, 2>(w, out);
  } else {
    static_assert(kBytes == 4, "vector loads are 4, 8, 16 or 32 bytes");
    const uint32_t w[1] = {__ldg(reinterpret_cast<const unsigned int*>(p))};
    unpack_words<T, VEC, 1>(w, out);
  }
}

// VEC floats to dst (16-byte aligned when VEC % 4 == 0).
template <int VEC>
__device__ __forceinline__ void store_vec(float* dst, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = v[i];
  }
}

// The activation is a runtime switch (uniform over the grid): it runs once per (row, token), so
// a template parameter would only triple the number of kernels to compile.
__device__ __forceinline__ float activate(float a, int act) {
  if (act == SFNN_ACT_RELU) return a < 0.f ? 0.f : a;  // NaN passes through, as in torch
  if (act == SFNN_ACT_GELU) return 0.5f * a * (1.f + erff(a * 0.7071067811865476f));
  return a / (1.f + expf(-a));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Each lane holds 32 values v[0..31]; afterwards v[0] of lane l is the sum over the warp of
// v[l]. Recursive halving: at distance K a lane keeps the half of its values whose index bit K
// equals its own lane bit K and receives the partner's copy of that half: 16+8+4+2+1 shuffles.
// (K is a template parameter so that every index is a constant and v stays in registers.)
template <int K = 16>
__device__ __forceinline__ void warp_reduce_scatter32(float (&v)[32], int lane) {
  const bool upper = (lane & K) != 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float send = upper ? v[i] : v[i + K];
    const float keep = upper ? v[i + K] : v[i];
    v[i] = keep + __shfl_xor_sync(kFullMask, send, K);
  }
  if constexpr (K > 1) warp_reduce_scatter32<K / 2>(v, lane);
}

// ---------------------------------------------------------------------------------------------
// Parameters, phases and their handshakes

// Everything a launch needs, passed by value. Pointers of the call's dtype are typed in the
// kernel; idx is the caller's indices (read only) in ffn mode and the output of K otherwise.
struct Params {
  const void* x;
  int64_t x_stride;
  const void* kbar;
  int64_t kbar_stride;
  int kbar_bf16;  // kbar is bfloat16 (else float32)
  const float* bbar;
  const void* keys;
  int64_t k_stride;
  const void* values;
  int64_t v_stride;
  const void* key_bias;
  const void* gate_keys;  // gated FFN: the gate table (act applies to it), or nullptr
  int64_t gk_stride;
  const void* gate_bias;
  const void* out_bias;
  const float* gates;
  int64_t gate_stride;
  int32_t* idx;
  int64_t idx_stride;
  void* y;
  int64_t y_stride;
  int act;
  int64_t T, n_blocks, d_model, top_k, block_size;
  // The plan (see make_plan): S's tiling, F's row chunks, the partials' row length, C's tiles,
  // and the thread blocks of each phase in ticket order (0: the phase is not part of the call).
  int64_t row_ctas, n_slices, slice_width;
  int64_t n_chunks, chunk_rows, ws_ld, col_tiles;
  int64_t n_score, n_topk, n_ffn, n_combine;
  // Workspace: counters, S's partial scores (n_slices, T, n_blocks), K's keys (T, n_blocks) and
  // selection (T, top_k), F's first-slot flags (T, top_k) and partial rows
  // (T * top_k * n_chunks, ws_ld).
  unsigned* sync;
  float* part;
  unsigned long long* skeys;
  unsigned long long* sel;
  int32_t* first;
  float* ws;
};

// Counters at the start of the workspace (zeroed before each launch).
enum SyncWord : int { kTicket = 0, kDoneScore = 1, kDoneTopk = 2, kDoneFfn = 3, kSyncWords = 4 };
constexpr size_t kSyncBytes = 256;  // keeps what follows 256-byte aligned
constexpr size_t kCtrlBytes = 16;   // shared memory: the ticket, then the phase's buffers
constexpr unsigned kSpinNs = 64;

// This block's results are complete: count it in *counter (release).
__device__ __forceinline__ void arrive(unsigned* counter) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
  }
}

// Wait until *counter reaches target (acquire). Every block counted there holds an earlier
// ticket, so it is running or done.
__device__ __forceinline__ void wait_for(const unsigned* counter, int64_t target) {
  if (threadIdx.x == 0 && target > 0) {
    while (static_cast<int64_t>(*reinterpret_cast<const volatile unsigned*>(counter)) < target) {
      __nanosleep(kSpinNs);
    }
    __threadfence();
  }
  __syncthreads();
}

// Indices are an input (ffn mode) or written by K in this launch: read them through L2.
__device__ __forceinline__ int32_t load_index(const Params& p, int64_t t, int64_t j) {
  return __ldcg(p.idx + t * p.idx_stride + j);
}

// ----- S: scores

constexpr int kScoreRows = 2;     // kbar rows per warp
constexpr int kScoreTokens = 16;  // tokens per tile
constexpr int64_t kScoreMinSlice = 1024;
constexpr int kScoreVec = 4;
constexpr int64_t kScoreStep = kWarp * kScoreVec;  // slice widths are multiples of it
static_assert(kScoreRows * kScoreTokens == kWarp, "one reduced value per lane");

template <typename TX, typename TK, bool VEC>
__device__ __forceinline__ void score_tile(const Params& p, int64_t job) {
  // kbar elements per load: 16 bytes of fp32, 8 of bf16 (8 bf16 per load would need more
  // registers than two blocks per SM leave: the loop is unrolled twice for loads in flight)
  constexpr int E = VEC ? kScoreVec : 1;
  const TX* __restrict__ x = static_cast<const TX*>(p.x);
  const TK* __restrict__ kbar = static_cast<const TK*>(p.kbar);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row_cta = job % p.row_ctas;
  const int64_t slice = (job / p.row_ctas) % p.n_slices;
  const int64_t tile = job / (p.row_ctas * p.n_slices);
  const int64_t n_blocks = p.n_blocks;
  const int64_t row0 = (row_cta * kWarps + warp) * kScoreRows;
  if (row0 >= n_blocks) return;  // whole warp; no block-wide barrier until the phase ends
  const int64_t t0 = tile * kScoreTokens;
  const int nt = static_cast<int>(p.T - t0 < kScoreTokens ? p.T - t0 : kScoreTokens);
  const int64_t c_begin = slice * p.slice_width;
  const int64_t c_end = c_begin + p.slice_width < p.d_model ? c_begin + p.slice_width : p.d_model;
  const int64_t c_vec_end = c_begin + (c_end - c_begin) / E * E;

  const TK* p_k[kScoreRows];
#pragma unroll
  for (int r = 0; r < kScoreRows; ++r) {
    // A row past the end re-reads the last row; its result is not stored.
    const int64_t row = row0 + r < n_blocks ? row0 + r : n_blocks - 1;
    p_k[r] = kbar + row * p.kbar_stride;
  }
  const TX* p_x = x + t0 * p.x_stride;

  float acc[kScoreRows][kScoreTokens];
#pragma unroll
  for (int r = 0; r < kScoreRows; ++r)
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) acc[r][t] = 0.f;

#pragma unroll 2
  for (int64_t c = c_begin + static_cast<int64_t>(lane) * E; c < c_vec_end;
       c += static_cast<int64_t>(kWarp) * E) {
    float b_k[kScoreRows][E];  // [R, E]
#pragma unroll
    for (int r = 0; r < kScoreRows; ++r) load_vec<TK, E>(p_k[r] + c, b_k[r]);
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) {
      if (t < nt) {
        float b_x[E];
        load_vec<TX, E>(p_x + t * p.x_stride + c, b_x);
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][t] = fmaf(b_k[r][e], b_x[e], acc[r][t]);
      }
    }
  }
  for (int64_t c = c_vec_end + lane; c < c_end; c += kWarp) {
    float b_k[kScoreRows];
#pragma unroll
    for (int r = 0; r < kScoreRows; ++r) b_k[r] = to_float(__ldg(p_k[r] + c));
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) {
      if (t < nt) {
        const float b_x = to_float(__ldg(p_x + t * p.x_stride + c));
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r) acc[r][t] = fmaf(b_k[r], b_x, acc[r][t]);
      }
    }
  }

  float v[kWarp];
#pragma unroll
  for (int r = 0; r < kScoreRows; ++r)
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) v[r * kScoreTokens + t] = acc[r][t];
  warp_reduce_scatter32(v, lane);
  const int r = lane / kScoreTokens;
  const int t = lane % kScoreTokens;
  if (t < nt && row0 + r < n_blocks) p.part[(slice * p.T + t0 + t) * n_blocks + row0 + r] = v[0];
}

// kbar's dtype is a runtime switch (uniform over the grid): as a template parameter it would
// double the kernels to compile, each with its own copy of the other phases.
template <typename TX, bool VEC>
__device__ __forceinline__ void score_phase(const Params& p, int64_t job) {
  if (p.kbar_bf16) {
    score_tile<TX, __nv_bfloat16, VEC>(p, job);
  } else {
    score_tile<TX, float, VEC>(p, job);
  }
}

// ----- K: top-K

constexpr size_t kTopkSmem = sizeof(unsigned) * (256 + 4);

// Order-preserving key: larger key <=> larger score, then smaller block index.
__device__ __forceinline__ unsigned long long make_key(float s, int64_t b) {
  if (s != s) s = __uint_as_float(0x7fc00000u);  // every NaN -> the canonical quiet NaN
  if (s == 0.f) s = 0.f;                          // -0 -> +0: equal scores, equal bits
  uint32_t u = __float_as_uint(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(b));
}

// skeys (T, n_blocks) and sel (T, top_k) are per-token scratch in global memory, written and
// read back inside this block only.
__device__ __forceinline__ void topk_phase(const Params& p, int64_t t, unsigned char* buf) {
  unsigned* s_hist = reinterpret_cast<unsigned*>(buf);  // [256]
  unsigned* s_digit = s_hist + 256;
  unsigned* s_krem = s_hist + 257;
  unsigned* s_full = s_hist + 258;
  unsigned* s_count = s_hist + 259;
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int64_t n_blocks = p.n_blocks;
  const int64_t top_k = p.top_k;
  unsigned long long* p_keys = p.skeys + t * n_blocks;
  unsigned long long* p_sel = p.sel + t * top_k;
  if (tid == 0) *s_count = 0;

  // Each thread owns blocks tid, tid + 256, ...: it writes and re-reads only its own keys.
  for (int64_t b = tid; b < n_blocks; b += kThreads) {
    float s = 0.f;
    for (int64_t i = 0; i < p.n_slices; ++i) s += __ldcg(p.part + (i * p.T + t) * n_blocks + b);
    if (p.bbar != nullptr) s += __ldg(p.bbar + b);
    p_keys[b] = make_key(s, b);
  }

  // MSD radix select of the top_k-th largest key, 8 bits at a time.
  unsigned long long prefix = 0;
  unsigned int k_rem = static_cast<unsigned int>(top_k);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) s_hist[i] = 0;
    __syncthreads();
    const unsigned long long hi_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int64_t b = tid; b < n_blocks; b += kThreads) {
      const unsigned long long k = p_keys[b];
      if ((k & hi_mask) == prefix) atomicAdd(&s_hist[(k >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {
      unsigned int c[8];
      unsigned int local = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = s_hist[lane * 8 + i];
        local += c[i];
      }
      unsigned int incl = local;  // sum over lanes >= lane
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const unsigned int o = __shfl_down_sync(kFullMask, incl, off);
        if (lane + off < kWarp) incl += o;
      }
      unsigned int above = incl - local;  // keys in higher bins than this lane's
#pragma unroll
      for (int i = 7; i >= 0; --i) {
        if (above < k_rem && k_rem <= above + c[i]) {
          *s_digit = static_cast<unsigned int>(lane * 8 + i);
          *s_krem = k_rem - above;
          *s_full = c[i] == k_rem - above;
        }
        above += c[i];
      }
    }
    __syncthreads();
    prefix |= static_cast<unsigned long long>(*s_digit) << shift;
    k_rem = *s_krem;
    // s_digit / s_krem / s_full are rewritten two barriers later, after every thread read them
    if (*s_full) break;  // the whole bin is taken: the top_k keys are exactly those >= prefix
  }

  // Gather the top_k keys (any order), then write each at its rank.
  for (int64_t b = tid; b < n_blocks; b += kThreads) {
    const unsigned long long k = p_keys[b];
    if (k >= prefix) p_sel[atomicAdd(s_count, 1u)] = k;
  }
  __syncthreads();
  for (int64_t i = tid; i < top_k; i += kThreads) {
    const unsigned long long k = p_sel[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < top_k; ++j) rank += p_sel[j] > k;
    p.idx[t * p.idx_stride + rank] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(k));
  }
}

// ----- F: gather-GEMV over one (slot, row chunk)

constexpr int kFfnTokens = 8;  // tokens per pass over a block's rows
constexpr int64_t kFfnMinChunkRows = 8;
constexpr int64_t kFfnMaxChunkRows = 1024;  // keeps the h buffer <= 32 KiB of shared memory
// Value rows in flight per thread in phase 2. Under sm_80's 128-register cap (two blocks per SM
// for 16-bit inputs) its ptxas spills at 4; sm_90's does not.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kValueUnroll = 2;
#else
constexpr int kValueUnroll = 4;
#endif
// s_tok, s_slot (int64), s_w (float) per thread and s_wcount per warp, before h.
constexpr size_t kFfnFixedSmem = (8 + 8 + 4) * kThreads + 4 * kWarps;
static_assert(kFfnFixedSmem % 16 == 0, "h stays 16-byte aligned");

// Phase 1's dot products: lane q < m gets x[q] . row for the m (<= kFfnTokens) tokens p_x, a
// warp reading the row once (V-element vectors, then a scalar tail from c_vec_end).
template <typename TX, int V>
__device__ __forceinline__ float warp_row_dots(const TX* p_k, const TX* const* p_x, int m,
                                               int64_t c_vec_end, int64_t d_model, int lane) {
  float acc[kFfnTokens];
#pragma unroll
  for (int q = 0; q < kFfnTokens; ++q) acc[q] = 0.f;
#pragma unroll 2
  for (int64_t c = static_cast<int64_t>(lane) * V; c < c_vec_end;
       c += static_cast<int64_t>(kWarp) * V) {
    float b_k[V];
    load_vec<TX, V>(p_k + c, b_k);
#pragma unroll
    for (int q = 0; q < kFfnTokens; ++q) {
      if (q < m) {
        float b_x[V];
        load_vec<TX, V>(p_x[q] + c, b_x);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[q] = fmaf(b_k[e], b_x[e], acc[q]);
      }
    }
  }
  for (int64_t c = c_vec_end + lane; c < d_model; c += kWarp) {
    const float b_k = to_float(__ldg(p_k + c));
#pragma unroll
    for (int q = 0; q < kFfnTokens; ++q) {
      if (q < m) acc[q] = fmaf(b_k, to_float(__ldg(p_x[q] + c)), acc[q]);
    }
  }
  float mine = 0.f;
#pragma unroll
  for (int q = 0; q < kFfnTokens; ++q) {
    const float total = warp_sum(acc[q]);
    if (q == lane) mine = total;
  }
  return mine;
}

template <typename TX, bool VEC>
__device__ __forceinline__ void ffn_phase(const Params& p, int64_t job, unsigned char* buf) {
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(TX)) : 1;
  const TX* __restrict__ x = static_cast<const TX*>(p.x);
  const TX* __restrict__ keys = static_cast<const TX*>(p.keys);
  const TX* __restrict__ values = static_cast<const TX*>(p.values);
  const TX* __restrict__ key_bias = static_cast<const TX*>(p.key_bias);
  const TX* __restrict__ gate_keys = static_cast<const TX*>(p.gate_keys);
  const TX* __restrict__ gate_bias = static_cast<const TX*>(p.gate_bias);
  int64_t* s_tok = reinterpret_cast<int64_t*>(buf);  // [kThreads]
  int64_t* s_slot = s_tok + kThreads;                 // [kThreads]
  float* s_w = reinterpret_cast<float*>(s_slot + kThreads);  // [kThreads]
  int* s_wcount = reinterpret_cast<int*>(s_w + kThreads);    // [kWarps]
  float* s_h = reinterpret_cast<float*>(buf + kFfnFixedSmem);  // [kFfnTokens, chunk_rows]

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int64_t T = p.T;
  const int64_t top_k = p.top_k;
  const int64_t chunk_rows = p.chunk_rows;
  const int64_t d_model = p.d_model;
  const int64_t slot = job / p.n_chunks;
  const int64_t chunk = job - slot * p.n_chunks;
  const int64_t b = load_index(p, slot / top_k, slot % top_k);
  if (b < 0 || b >= p.n_blocks) return;  // uniform over the block

  // Only the first slot (row-major) that names block b works on it.
  bool earlier = false;
  for (int64_t e = tid; e < slot; e += kThreads) earlier |= load_index(p, e / top_k, e % top_k) == b;
  if (__syncthreads_or(earlier)) return;

  const int64_t row_begin = b * p.block_size + chunk * chunk_rows;
  const int64_t rem_rows = p.block_size - chunk * chunk_rows;
  const int nrows = static_cast<int>(rem_rows < chunk_rows ? rem_rows : chunk_rows);
  const int64_t c_vec_end = d_model / V * V;
  float* const ws = p.ws;
  const int64_t ws_ld = p.ws_ld;

  // T <= SFNN_DECODE_MAX_TOKENS: a 32-bit tile counter (a 64-bit one spills on sm_80).
  for (int t_base = 0; t_base < static_cast<int>(T); t_base += kThreads) {
    // The tokens of this tile that chose b, in token order, with summed gates and first slot;
    // chunk 0 also flags, for each slot naming b, whether it is its token's first.
    const int64_t t = t_base + tid;
    bool chose = false;
    float w = 0.f;
    int64_t first_j = 0;
    if (t < T) {
      for (int64_t j = 0; j < top_k; ++j) {
        if (load_index(p, t, j) == b) {
          if (chunk == 0) p.first[t * top_k + j] = chose ? 0 : 1;
          if (!chose) first_j = j;
          chose = true;
          w += p.gates != nullptr ? __ldg(p.gates + t * p.gate_stride + j) : 1.f;
        }
      }
    }
    const unsigned ballot = __ballot_sync(kFullMask, chose);
    if (lane == 0) s_wcount[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0;
    int m_tile = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      offset += i < warp ? s_wcount[i] : 0;
      m_tile += s_wcount[i];
    }
    if (chose) {
      const int pos = offset + __popc(ballot & ((1u << lane) - 1u));
      s_tok[pos] = t;
      s_slot[pos] = t * top_k + first_j;
      s_w[pos] = w;
    }
    __syncthreads();

    for (int p0 = 0; p0 < m_tile; p0 += kFfnTokens) {
      const int m = m_tile - p0 < kFfnTokens ? m_tile - p0 : kFfnTokens;
      const TX* p_x[kFfnTokens];
#pragma unroll
      for (int q = 0; q < kFfnTokens; ++q) p_x[q] = x + s_tok[p0 + (q < m ? q : 0)] * p.x_stride;

      // Phase 1: a warp per key row, h for the m tokens. Gated: a second pass over the same
      // rows (each lane owns the same h cells) reads the gate rows, h = act(x . kg + bg) *
      // (x . k + b); two loops keep one set of partial sums live (one loop spills on sm_80).
      const bool gated = gate_keys != nullptr;
      for (int r = warp; r < nrows; r += kWarps) {
        const float up = warp_row_dots<TX, V>(keys + (row_begin + r) * p.k_stride, p_x, m,
                                              c_vec_end, d_model, lane) +
                         (key_bias != nullptr ? to_float(__ldg(key_bias + row_begin + r)) : 0.f);
        if (lane < m) {
          s_h[lane * chunk_rows + r] = gated ? up : s_w[p0 + lane] * activate(up, p.act);
        }
      }
      if (gated) {
        for (int r = warp; r < nrows; r += kWarps) {
          const float pre_g =
              warp_row_dots<TX, V>(gate_keys + (row_begin + r) * p.gk_stride, p_x, m, c_vec_end,
                                   d_model, lane) +
              (gate_bias != nullptr ? to_float(__ldg(gate_bias + row_begin + r)) : 0.f);
          if (lane < m) {
            float* const h = s_h + lane * chunk_rows + r;  // this lane's own cell
            *h = s_w[p0 + lane] * activate(pre_g, p.act) * *h;
          }
        }
      }
      __syncthreads();

      // Phase 2: a thread per column vector, y_partial[q] = sum_r h[q, r] * v_r.
      for (int64_t c = static_cast<int64_t>(tid) * V; c < c_vec_end;
           c += static_cast<int64_t>(kThreads) * V) {
        float acc[kFfnTokens][V];
#pragma unroll
        for (int q = 0; q < kFfnTokens; ++q)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[q][e] = 0.f;
        const TX* p_v = values + row_begin * p.v_stride + c;
#pragma unroll(kValueUnroll)
        for (int r = 0; r < nrows; ++r) {
          float b_v[V];
          load_vec<TX, V>(p_v + r * p.v_stride, b_v);
#pragma unroll
          for (int q = 0; q < kFfnTokens; ++q) {
            if (q < m) {
              const float h = s_h[q * chunk_rows + r];
#pragma unroll
              for (int e = 0; e < V; ++e) acc[q][e] = fmaf(h, b_v[e], acc[q][e]);
            }
          }
        }
#pragma unroll
        for (int q = 0; q < kFfnTokens; ++q) {
          if (q < m) store_vec<V>(ws + (s_slot[p0 + q] * p.n_chunks + chunk) * ws_ld + c, acc[q]);
        }
      }
      for (int64_t c = c_vec_end + tid; c < d_model; c += kThreads) {
        float acc[kFfnTokens];
#pragma unroll
        for (int q = 0; q < kFfnTokens; ++q) acc[q] = 0.f;
        for (int r = 0; r < nrows; ++r) {
          const float b_v = to_float(__ldg(values + (row_begin + r) * p.v_stride + c));
#pragma unroll
          for (int q = 0; q < kFfnTokens; ++q) {
            if (q < m) acc[q] = fmaf(s_h[q * chunk_rows + r], b_v, acc[q]);
          }
        }
#pragma unroll
        for (int q = 0; q < kFfnTokens; ++q) {
          if (q < m) ws[(s_slot[p0 + q] * p.n_chunks + chunk) * ws_ld + c] = acc[q];
        }
      }
      __syncthreads();  // s_h is rewritten by the next group
    }
    __syncthreads();  // s_wcount / s_tok are rewritten by the next tile
  }
}

// ----- C: combine

constexpr int kCombineCols = 4 * kWarp;  // columns per combine block
constexpr size_t kCombineSmem = sizeof(float) * 4 * kThreads;

template <typename TX>
__device__ __forceinline__ void combine_phase(const Params& p, int64_t job, unsigned char* buf) {
  float4* s_part = reinterpret_cast<float4*>(buf);  // [kWarps][kWarp]
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t t = job / p.col_tiles;
  const int64_t d_model = p.d_model;
  const int64_t c = (job - t * p.col_tiles) * kCombineCols + 4 * lane;
  const int64_t ws_ld = p.ws_ld;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (c < d_model) {
    const int n = d_model - c < 4 ? static_cast<int>(d_model - c) : 4;  // columns of this lane
    for (int64_t j = warp; j < p.top_k; j += kWarps) {
      const int32_t b = load_index(p, t, j);
      if (b < 0 || b >= p.n_blocks || __ldcg(p.first + t * p.top_k + j) == 0) continue;
      const float* p_ws = p.ws + (t * p.top_k + j) * p.n_chunks * ws_ld + c;
      if (n == 4) {
#pragma unroll 4
        for (int64_t ch = 0; ch < p.n_chunks; ++ch) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(p_ws + ch * ws_ld));
          acc[0] += v.x;
          acc[1] += v.y;
          acc[2] += v.z;
          acc[3] += v.w;
        }
      } else {  // the last, partial vector of a row: never read the unwritten padding
        for (int64_t ch = 0; ch < p.n_chunks; ++ch) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if (e < n) acc[e] += __ldcg(p_ws + ch * ws_ld + e);
          }
        }
      }
    }
  }
  s_part[warp * kWarp + lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  if (warp != 0 || c >= d_model) return;
  float r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float4 v = s_part[w * kWarp + lane];
    r[0] += v.x;
    r[1] += v.y;
    r[2] += v.z;
    r[3] += v.w;
  }
  const TX* out_bias = static_cast<const TX*>(p.out_bias);
  TX* y = static_cast<TX*>(p.y);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (c + e < d_model) {
      const float ob = out_bias != nullptr ? to_float(__ldg(out_bias + c + e)) : 0.f;
      y[t * p.y_stride + c + e] = from_float<TX>(r[e] + ob);
    }
  }
}

// ----- the kernel

// minBlocksPerSM: 2 for 16-bit inputs (the decode case) keeps two blocks (16 warps) per SM for
// latency hiding, i.e. <= 128 registers; fp32's 8 x 4 accumulators + 16-byte loads in F need
// more, so it gets 1.
template <typename TX, bool VEC>
__global__ void __launch_bounds__(kThreads, sizeof(TX) == 4 ? 1 : 2)
    decode_kernel(const Params p) {
  SFNN_DYNAMIC_SMEM(unsigned char, smem);
  unsigned* s_ticket = reinterpret_cast<unsigned*>(smem);
  unsigned char* buf = smem + kCtrlBytes;
  if (threadIdx.x == 0) *s_ticket = atomicAdd(p.sync + kTicket, 1u);
  __syncthreads();
  int64_t job = *s_ticket;
  if (job < p.n_score) {
    score_phase<TX, VEC>(p, job);
    arrive(p.sync + kDoneScore);
    return;
  }
  job -= p.n_score;
  if (job < p.n_topk) {
    wait_for(p.sync + kDoneScore, p.n_score);
    topk_phase(p, job, buf);
    arrive(p.sync + kDoneTopk);
    return;
  }
  job -= p.n_topk;
  if (job < p.n_ffn) {
    wait_for(p.sync + kDoneTopk, p.n_topk);
    ffn_phase<TX, VEC>(p, job, buf);
    arrive(p.sync + kDoneFfn);
    return;
  }
  job -= p.n_ffn;
  wait_for(p.sync + kDoneFfn, p.n_ffn);
  combine_phase<TX>(p, job, buf);
}

// ---------------------------------------------------------------------------------------------
// Host side

thread_local char g_error[512];

cudaError_t fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
cudaError_t fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, args);
  va_end(args);
  return cudaErrorInvalidValue;
}

int sm_count() {
  static int cache[64] = {0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 132;
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      n = 132;
    }
    cache[device] = n;
  }
  return cache[device];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t n) { return (n + 255) / 256 * 256; }

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

constexpr int64_t kMaxGrid = 0x7fffffffLL;

// Thread blocks, workspace layout and shared memory of one call. Phases: S + K (select), F + C
// (ffn), or all four (step).
struct Plan {
  int64_t row_ctas = 0, n_slices = 0, slice_width = 0;
  int64_t n_chunks = 0, chunk_rows = 0, ws_ld = 0, col_tiles = 0;
  int64_t n_score = 0, n_topk = 0, n_ffn = 0, n_combine = 0;
  size_t off_part = 0, off_keys = 0, off_sel = 0, off_first = 0, off_ws = 0, bytes = 0;
  size_t smem = 0;
  int64_t ctas() const { return n_score + n_topk + n_ffn + n_combine; }
};

// Checks the sizes against the kernels' limits and plans the call; on failure returns
// cudaErrorInvalidValue with sfnn_decode_last_error() saying which limit.
cudaError_t make_plan(bool select, bool ffn, int64_t T, int64_t n_blocks, int64_t d_model,
                      int64_t top_k, int64_t block_size, int sms, Plan* out) {
  if (T < 1) return fail("T (tokens) must be >= 1, got %lld", static_cast<long long>(T));
  if (T > SFNN_DECODE_MAX_TOKENS) {
    return fail("T=%lld tokens is past the decode kernels' limit of %d tokens per call (they serve "
                "decoding; use backend='triton' or 'torch' for long inputs)",
                static_cast<long long>(T), SFNN_DECODE_MAX_TOKENS);
  }
  if (d_model < 1 || d_model > kMaxGrid) {
    return fail("d_model must be in [1, %lld], got %lld", static_cast<long long>(kMaxGrid),
                static_cast<long long>(d_model));
  }
  if (n_blocks < 1 || n_blocks > kMaxGrid) {
    return fail("n_blocks must be in [1, %lld] (int32 block indices), got %lld",
                static_cast<long long>(kMaxGrid), static_cast<long long>(n_blocks));
  }
  if (top_k < 1 || (select && top_k > n_blocks) || top_k > kMaxGrid) {
    return fail("top_k must be in [1, %lld], got %lld",
                static_cast<long long>(select ? n_blocks : kMaxGrid),
                static_cast<long long>(top_k));
  }
  if (ffn && block_size < 1) {
    return fail("block_size must be >= 1, got %lld", static_cast<long long>(block_size));
  }
  Plan p;
  size_t off = kSyncBytes;
  size_t smem = 0;
  double bytes = static_cast<double>(kSyncBytes);
  if (select) {
    p.row_ctas = ceil_div(n_blocks, kWarps * kScoreRows);
    int64_t slices = ceil_div(2 * static_cast<int64_t>(sms), p.row_ctas);
    const int64_t max_slices = d_model / kScoreMinSlice > 1 ? d_model / kScoreMinSlice : 1;
    slices = slices < 1 ? 1 : (slices > max_slices ? max_slices : slices);
    p.slice_width = ceil_div(ceil_div(d_model, slices), kScoreStep) * kScoreStep;
    p.n_slices = ceil_div(d_model, p.slice_width);
    p.n_score = p.row_ctas * p.n_slices * ceil_div(T, kScoreTokens);
    p.n_topk = T;
    bytes += 4.0 * p.n_slices * T * n_blocks + 8.0 * T * n_blocks + 8.0 * T * top_k;
    smem = kTopkSmem;
  }
  if (ffn) {
    const int64_t slots = T * top_k;
    int64_t chunks = slots < sms ? ceil_div(sms, slots) : 1;
    const int64_t max_chunks = ceil_div(block_size, kFfnMinChunkRows);
    chunks = chunks > max_chunks ? max_chunks : chunks;
    p.chunk_rows = ceil_div(block_size, chunks);
    if (p.chunk_rows > kFfnMaxChunkRows) p.chunk_rows = kFfnMaxChunkRows;
    p.n_chunks = ceil_div(block_size, p.chunk_rows);
    p.ws_ld = ceil_div(d_model, 4) * 4;
    p.col_tiles = ceil_div(d_model, kCombineCols);
    p.n_ffn = slots * p.n_chunks;
    p.n_combine = T * p.col_tiles;
    bytes += 4.0 * slots + 4.0 * slots * p.n_chunks * p.ws_ld;
    const size_t ffn_smem =
        kFfnFixedSmem + sizeof(float) * kFfnTokens * static_cast<size_t>(p.chunk_rows);
    smem = smem > ffn_smem ? smem : ffn_smem;
    smem = smem > kCombineSmem ? smem : kCombineSmem;
  }
  if (p.ctas() > kMaxGrid) {
    return fail("the launch needs %lld thread blocks (%lld to score, %lld for T*top_k = %lld "
                "slots x %lld row chunks, %lld to combine), past CUDA's grid limit of %lld: "
                "lower T or top_k",
                static_cast<long long>(p.ctas()), static_cast<long long>(p.n_score),
                static_cast<long long>(p.n_ffn), static_cast<long long>(T * top_k),
                static_cast<long long>(p.n_chunks), static_cast<long long>(p.n_combine),
                static_cast<long long>(kMaxGrid));
  }
  if (bytes > 0x1p60) return fail("the workspace would take %.3g bytes", bytes);
  if (select) {
    p.off_part = off;
    off += align256(sizeof(float) * static_cast<size_t>(p.n_slices * T * n_blocks));
    p.off_keys = off;
    off += align256(sizeof(unsigned long long) * static_cast<size_t>(T * n_blocks));
    p.off_sel = off;
    off += align256(sizeof(unsigned long long) * static_cast<size_t>(T * top_k));
  }
  if (ffn) {
    p.off_first = off;
    off += align256(sizeof(int32_t) * static_cast<size_t>(T * top_k));
    p.off_ws = off;
    off += align256(sizeof(float) * static_cast<size_t>(T * top_k * p.n_chunks * p.ws_ld));
  }
  p.bytes = off;
  p.smem = kCtrlBytes + smem;
  *out = p;
  g_error[0] = '\0';
  return cudaSuccess;
}

template <typename TX>
cudaError_t launch(const Params& prm, const Plan& plan, bool vec, cudaStream_t stream) {
  const auto kernel = vec ? decode_kernel<TX, true> : decode_kernel<TX, false>;
  SFNN_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.ctas())), dim3(kThreads), plan.smem,
              stream)(prm);
  return cudaGetLastError();
}

// Fills in the plan and workspace pointers, zeroes the counters and launches.
cudaError_t run(Params prm, const Plan& plan, int dtype, int kbar_dtype, bool vec,
                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace == nullptr || workspace_bytes < plan.bytes || !aligned(workspace, 256)) {
    return fail("the workspace must be 256-byte aligned and hold >= %zu bytes (the matching "
                "*_workspace_bytes()), got %zu bytes at %p",
                plan.bytes, workspace_bytes, workspace);
  }
  char* ws = static_cast<char*>(workspace);
  prm.row_ctas = plan.row_ctas;
  prm.n_slices = plan.n_slices;
  prm.slice_width = plan.slice_width;
  prm.n_chunks = plan.n_chunks;
  prm.chunk_rows = plan.chunk_rows;
  prm.ws_ld = plan.ws_ld;
  prm.col_tiles = plan.col_tiles;
  prm.n_score = plan.n_score;
  prm.n_topk = plan.n_topk;
  prm.n_ffn = plan.n_ffn;
  prm.n_combine = plan.n_combine;
  prm.sync = reinterpret_cast<unsigned*>(ws);
  prm.part = plan.n_score ? reinterpret_cast<float*>(ws + plan.off_part) : nullptr;
  prm.skeys = plan.n_topk ? reinterpret_cast<unsigned long long*>(ws + plan.off_keys) : nullptr;
  prm.sel = plan.n_topk ? reinterpret_cast<unsigned long long*>(ws + plan.off_sel) : nullptr;
  prm.first = plan.n_ffn ? reinterpret_cast<int32_t*>(ws + plan.off_first) : nullptr;
  prm.ws = plan.n_ffn ? reinterpret_cast<float*>(ws + plan.off_ws) : nullptr;
  cudaError_t err = cudaMemsetAsync(ws, 0, sizeof(unsigned) * kSyncWords, stream);
  if (err != cudaSuccess) return err;
  prm.kbar_bf16 = kbar_dtype == SFNN_DTYPE_BF16;
  switch (dtype) {
    case SFNN_DTYPE_F32:
      err = launch<float>(prm, plan, vec, stream);
      break;
    case SFNN_DTYPE_F16:
      err = launch<__half>(prm, plan, vec, stream);
      break;
    case SFNN_DTYPE_BF16:
      err = launch<__nv_bfloat16>(prm, plan, vec, stream);
      break;
    default:
      return fail("dtype tag %d is not SFNN_DTYPE_F32/F16/BF16", dtype);
  }
  if (err != cudaSuccess) {
    snprintf(g_error, sizeof(g_error),
             "launching %lld thread blocks of %d threads with %zu bytes of shared memory "
             "failed: %s",
             static_cast<long long>(plan.ctas()), kThreads, plan.smem, cudaGetErrorString(err));
  }
  return err;
}

int64_t elem_bytes(int dtype) { return dtype == SFNN_DTYPE_F32 ? 4 : 2; }

bool dtype_ok(int dtype) { return dtype >= SFNN_DTYPE_F32 && dtype <= SFNN_DTYPE_BF16; }

// Vector loads for S: x and kbar aligned, row strides multiples of kScoreVec.
bool select_vec_ok(const void* x, int64_t x_stride, const void* kbar, int64_t kbar_stride) {
  return aligned(x, 16) && aligned(kbar, 16) && x_stride % kScoreVec == 0 &&
         kbar_stride % kScoreVec == 0;
}

// ... and for F: x, keys and values aligned, row strides multiples of the input's vector.
bool ffn_vec_ok(const void* x, int64_t x_stride, const void* keys, int64_t k_stride,
                const void* values, int64_t v_stride, int dtype) {
  const int64_t e = 16 / elem_bytes(dtype);
  return aligned(x, 16) && aligned(keys, 16) && aligned(values, 16) && x_stride % e == 0 &&
         k_stride % e == 0 && v_stride % e == 0;
}

cudaError_t check_tags(int dtype, int kbar_dtype, int activation) {
  if (!dtype_ok(dtype)) return fail("dtype tag %d is not SFNN_DTYPE_F32/F16/BF16", dtype);
  if (kbar_dtype != SFNN_DTYPE_F32 && kbar_dtype != SFNN_DTYPE_BF16) {
    return fail("kbar dtype tag %d is not SFNN_DTYPE_F32 or SFNN_DTYPE_BF16", kbar_dtype);
  }
  if (activation < SFNN_ACT_RELU || activation > SFNN_ACT_SILU) {
    return fail("activation tag %d is not SFNN_ACT_RELU/GELU/SILU", activation);
  }
  return cudaSuccess;
}

// The fields every entry point fills alike: the tokens, the indices (read in ffn mode, written
// by K otherwise) and the sizes (block_size 0 where no F runs).
Params call_params(const void* x, int64_t x_stride, int32_t* idx, int64_t idx_stride, int64_t T,
                   int64_t n_blocks, int64_t d_model, int64_t top_k, int64_t block_size) {
  Params p{};
  p.x = x;
  p.x_stride = x_stride;
  p.idx = idx;
  p.idx_stride = idx_stride;
  p.T = T;
  p.n_blocks = n_blocks;
  p.d_model = d_model;
  p.top_k = top_k;
  p.block_size = block_size;
  return p;
}

// S and K's inputs: the block means (their dtype is the launch's kbar_dtype) and mean biases.
void set_scores(Params& p, const void* kbar, int64_t kbar_stride, const float* bbar) {
  p.kbar = kbar;
  p.kbar_stride = kbar_stride;
  p.bbar = bbar;
}

// F and C's inputs and output: the tables, their biases, y and the activation.
void set_ffn(Params& p, const void* keys, int64_t k_stride, const void* values, int64_t v_stride,
             const void* key_bias, const void* out_bias, void* y, int64_t y_stride,
             int activation) {
  p.keys = keys;
  p.k_stride = k_stride;
  p.values = values;
  p.v_stride = v_stride;
  p.key_bias = key_bias;
  p.out_bias = out_bias;
  p.y = y;
  p.y_stride = y_stride;
  p.act = activation;
}

}  // namespace

const char* sfnn_decode_last_error(void) { return g_error; }

size_t sfnn_decode_select_workspace_bytes(int64_t T, int64_t n_blocks, int64_t d_model,
                                          int64_t top_k, int /*device*/) {
  Plan plan;
  if (make_plan(true, false, T, n_blocks, d_model, top_k, 0, sm_count(), &plan) != cudaSuccess) {
    return 0;
  }
  return plan.bytes;
}

cudaError_t sfnn_decode_select(const void* x, int x_dtype, int64_t x_stride, const void* kbar,
                               int kbar_dtype, int64_t kbar_stride, const float* bbar, int64_t T,
                               int64_t n_blocks, int64_t d_model, int64_t top_k, int32_t* out,
                               int64_t out_stride, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  Plan plan;
  cudaError_t err = make_plan(true, false, T, n_blocks, d_model, top_k, 0, sm_count(), &plan);
  if (err != cudaSuccess) return err;
  if ((err = check_tags(x_dtype, kbar_dtype, SFNN_ACT_RELU)) != cudaSuccess) return err;
  if (x == nullptr || kbar == nullptr || out == nullptr) {
    return fail("x, kbar and out must not be null");
  }
  Params prm = call_params(x, x_stride, out, out_stride, T, n_blocks, d_model, top_k, 0);
  set_scores(prm, kbar, kbar_stride, bbar);
  const bool vec = select_vec_ok(x, x_stride, kbar, kbar_stride);
  return run(prm, plan, x_dtype, kbar_dtype, vec, workspace, workspace_bytes, stream);
}

size_t sfnn_decode_ffn_workspace_bytes(int64_t T, int64_t top_k, int64_t block_size,
                                       int64_t d_model, int /*device*/) {
  Plan plan;
  if (make_plan(false, true, T, 1, d_model, top_k, block_size, sm_count(), &plan) != cudaSuccess) {
    return 0;
  }
  return plan.bytes;
}

cudaError_t sfnn_decode_ffn_gated(
    const void* x, int64_t x_stride, const void* keys, int64_t k_stride, const void* values,
    int64_t v_stride, const int32_t* indices, int64_t idx_stride, const void* key_bias,
    const void* out_bias, const float* gates, int64_t gate_stride, void* y, int64_t y_stride,
    int dtype, int activation, int64_t T, int64_t top_k, int64_t n_blocks, int64_t block_size,
    int64_t d_model, void* workspace, size_t workspace_bytes, cudaStream_t stream,
    const void* gate_keys, int64_t gk_stride, const void* gate_bias) {
  Plan plan;
  cudaError_t err =
      make_plan(false, true, T, n_blocks, d_model, top_k, block_size, sm_count(), &plan);
  if (err != cudaSuccess) return err;
  if ((err = check_tags(dtype, SFNN_DTYPE_F32, activation)) != cudaSuccess) return err;
  if (x == nullptr || keys == nullptr || values == nullptr || indices == nullptr ||
      y == nullptr) {
    return fail("x, keys, values, indices and y must not be null");
  }
  if (gate_keys == nullptr && gate_bias != nullptr) return fail("gate_bias without gate_keys");
  // indices are read only: ffn mode has no K phase
  Params prm = call_params(x, x_stride, const_cast<int32_t*>(indices), idx_stride, T, n_blocks,
                           d_model, top_k, block_size);
  set_ffn(prm, keys, k_stride, values, v_stride, key_bias, out_bias, y, y_stride, activation);
  prm.gate_keys = gate_keys;
  prm.gk_stride = gk_stride;
  prm.gate_bias = gate_bias;
  prm.gates = gates;
  prm.gate_stride = gate_stride;
  const bool vec = ffn_vec_ok(x, x_stride, keys, k_stride, values, v_stride, dtype) &&
                   (gate_keys == nullptr ||
                    ffn_vec_ok(x, x_stride, gate_keys, gk_stride, values, v_stride, dtype));
  return run(prm, plan, dtype, SFNN_DTYPE_F32, vec, workspace, workspace_bytes, stream);
}

cudaError_t sfnn_decode_ffn(const void* x, int64_t x_stride, const void* keys, int64_t k_stride,
                            const void* values, int64_t v_stride, const int32_t* indices,
                            int64_t idx_stride, const void* key_bias, const void* out_bias,
                            const float* gates, int64_t gate_stride, void* y, int64_t y_stride,
                            int dtype, int activation, int64_t T, int64_t top_k,
                            int64_t n_blocks, int64_t block_size, int64_t d_model,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return sfnn_decode_ffn_gated(x, x_stride, keys, k_stride, values, v_stride, indices,
                               idx_stride, key_bias, out_bias, gates, gate_stride, y, y_stride,
                               dtype, activation, T, top_k, n_blocks, block_size, d_model,
                               workspace, workspace_bytes, stream, nullptr, 0, nullptr);
}

size_t sfnn_decode_step_workspace_bytes(int64_t T, int64_t n_blocks, int64_t block_size,
                                        int64_t d_model, int64_t top_k, int /*device*/) {
  Plan plan;
  if (make_plan(true, true, T, n_blocks, d_model, top_k, block_size, sm_count(), &plan) !=
      cudaSuccess) {
    return 0;
  }
  return plan.bytes;
}

cudaError_t sfnn_decode_step(const void* x, int64_t x_stride, const void* kbar, int kbar_dtype,
                             int64_t kbar_stride, const float* bbar, const void* keys,
                             int64_t k_stride, const void* values, int64_t v_stride,
                             const void* key_bias, const void* out_bias, int32_t* indices,
                             int64_t idx_stride, void* y, int64_t y_stride, int dtype,
                             int activation, int64_t T, int64_t n_blocks, int64_t block_size,
                             int64_t d_model, int64_t top_k, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  Plan plan;
  cudaError_t err =
      make_plan(true, true, T, n_blocks, d_model, top_k, block_size, sm_count(), &plan);
  if (err != cudaSuccess) return err;
  if ((err = check_tags(dtype, kbar_dtype, activation)) != cudaSuccess) return err;
  if (x == nullptr || kbar == nullptr || keys == nullptr || values == nullptr ||
      indices == nullptr || y == nullptr) {
    return fail("x, kbar, keys, values, indices and y must not be null");
  }
  Params prm =
      call_params(x, x_stride, indices, idx_stride, T, n_blocks, d_model, top_k, block_size);
  set_scores(prm, kbar, kbar_stride, bbar);
  set_ffn(prm, keys, k_stride, values, v_stride, key_bias, out_bias, y, y_stride, activation);
  const bool vec = select_vec_ok(x, x_stride, kbar, kbar_stride) &&
                   ffn_vec_ok(x, x_stride, keys, k_stride, values, v_stride, dtype);
  return run(prm, plan, dtype, kbar_dtype, vec, workspace, workspace_bytes, stream);
}
