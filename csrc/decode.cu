// Decoding kernels for the Avg-K block-sparse FFN (1-15 tokens per step): plain CUDA, no torch.
//
// Decoding is memory-bound, so every kernel is built around reading each byte of weights once,
// with 16-byte vector loads, and doing its arithmetic in fp32 from registers. All partial sums are
// combined in a fixed order: results are bitwise deterministic run to run (no float atomics).
//
// (a) sfnn_decode_select: Avg-K scoring + top-K, two kernels.
//   decode_scores_kernel: one pass over kbar (n_blocks, d_model) fp32 for a tile of up to 16
//     tokens. A warp owns 2 kbar rows; each lane reads 4 consecutive floats (one 16-byte load) of
//     both rows per step and FMAs them against the same 4 columns of the 16 tokens (x stays in
//     L1), keeping 2 x 16 = 32 fp32 partial dot products. A reduce-scatter butterfly (31 shuffles
//     instead of 32 x 5) leaves lane l with the total of (row l/16, token l%16), which it stores.
//     When kbar has too few rows to fill the GPU, d_model is cut into S slices (>= 1024 columns
//     each, blockIdx.y) whose partial scores go to a small fp32 workspace (S, T, n_blocks) and
//     are summed in slice order by the next kernel: deterministic, and kbar is still read once.
//   decode_topk_kernel: one CTA (512 threads) per token. Each score becomes a 64-bit key, the
//     order-preserving bits of the fp32 score above the inverted block index, so keys are
//     distinct and "larger key" means "larger score, then smaller index" (NaN is made the
//     canonical quiet NaN, which ranks above +inf as in torch.sort; -0 is made +0). The top_k-th
//     largest key is found by an MSD radix select, 8 bits per pass: every thread adds its keys
//     that still match the chosen prefix to a 256-bin shared-memory histogram, then warp 0 finds
//     the bin holding the k-th key with a warp suffix scan (each lane owns 8 bins) and narrows
//     the prefix; it stops as soon as that whole bin is taken (usually 3-4 passes, at most 8).
//     The top_k keys >= the threshold are gathered (smem atomic counter, any order) and each is
//     written at its rank, counted against the other top_k selected keys: best first, exact.
// (b) sfnn_decode_ffn: gather-GEMV, two kernels.
//   decode_ffn_blocks_kernel: one CTA (256 threads, 8 warps) per (slot (t, j), row chunk). The
//     CTA works only if its slot is the first, in row-major (t, j) order, to name its block, so
//     each distinct selected block is processed by exactly one CTA per chunk, which gathers the
//     list of tokens that chose the block (with their summed gates: a block chosen twice counts
//     twice) and reads the block's key and value rows once for all of them (groups of up to 8
//     tokens; a block chosen by more than 8 tokens of the step re-reads its rows, from L2).
//     Phase 1, keys: a warp per row; each lane reads 16 bytes of the key row per step (8 bf16 /
//     fp16 or 4 fp32) and of each listed token's x row, accumulates one fp32 dot product per
//     token, and a warp butterfly gives h = gate * act(x . k + b) into shared memory.
//     Phase 2, values: a thread per 16-byte column vector of the value rows, looping over the
//     chunk's rows, accumulating gate * h * v for each listed token in fp32 registers
//     (8 tokens x 8 columns). Rows are split into chunks only when the step has too few slots
//     to fill the GPU (decoding one token: top_k slots for ~132 SMs).
//   decode_ffn_combine_kernel: each (token, block, chunk) partial output is written to an fp32
//     workspace row at the token's first slot naming the block; this kernel sums, per token and
//     4-column vector, the partials (warp w takes slots w, w+8, ..., each over its chunks; the
//     8 warp sums are added in warp order), adds out_bias, and casts to the input dtype.
//     The partials cost top_k * chunks * d_model * 8 bytes per token (written and read back, in
//     L2 at decode sizes), a few percent of the weight bytes.
// Vector loads need 16-byte aligned base pointers and row strides that are a multiple of the
// vector width; otherwise the launcher picks the scalar instantiation (VEC = 1) of the same
// kernels. A d_model that is not a multiple of the vector width (with aligned strides) is
// finished by a scalar tail loop. Offsets that multiply a stride are int64.

#include "decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

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

// VEC consecutive elements at p (aligned to VEC * sizeof(T) bytes) as floats, through the
// read-only data cache. 16-, 8- and 4-byte vectors; VEC == 1 is a scalar load.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if constexpr (VEC == 1) {
    out[0] = to_float(__ldg(p));
  } else if constexpr (kBytes == 16) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
    unpack_words<T, VEC, 4>(w, out);
  } else if constexpr (kBytes == 8) {
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
    const uint32_t w[2] = {r.x, r.y};
    unpack_words<T, VEC, 2>(w, out);
  } else {
    static_assert(kBytes == 4, "vector loads are 4, 8 or 16 bytes");
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
// v[l]. Recursive halving: at distance k a lane keeps the half of its values whose index bit k
// equals its own lane bit k and receives the partner's copy of that half: 16+8+4+2+1 shuffles.
__device__ __forceinline__ void warp_reduce_scatter32(float (&v)[32], int lane) {
#pragma unroll
  for (int k = 16; k >= 1; k >>= 1) {
    const bool upper = (lane & k) != 0;
#pragma unroll
    for (int i = 0; i < k; ++i) {
      const float send = upper ? v[i] : v[i + k];
      const float keep = upper ? v[i + k] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, k);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (a) scoring + top-K

constexpr int kScoreWarps = 8;
constexpr int kScoreRows = 2;     // kbar rows per warp
constexpr int kScoreTokens = 16;  // tokens per tile (grid.z)
constexpr int kScoreVec = 4;      // fp32 kbar: 16-byte loads
constexpr int64_t kScoreMinSlice = 1024;
static_assert(kScoreRows * kScoreTokens == kWarp, "one reduced value per lane");

template <typename TX, int VEC>
__global__ void __launch_bounds__(kScoreWarps * kWarp)
    decode_scores_kernel(const TX* __restrict__ x, int64_t x_stride,
                         const float* __restrict__ kbar, int64_t kbar_stride, int64_t T,
                         int64_t n_blocks, int64_t d_model, int64_t slice_width,
                         float* __restrict__ part) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kScoreWarps + warp) * kScoreRows;
  if (row0 >= n_blocks) return;  // whole warp; this kernel has no block-wide barrier
  const int64_t t0 = static_cast<int64_t>(blockIdx.z) * kScoreTokens;
  const int nt = static_cast<int>(T - t0 < kScoreTokens ? T - t0 : kScoreTokens);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * slice_width;
  const int64_t c_end = c_begin + slice_width < d_model ? c_begin + slice_width : d_model;
  const int64_t c_vec_end = c_begin + (c_end - c_begin) / VEC * VEC;

  const float* p_k[kScoreRows];
#pragma unroll
  for (int r = 0; r < kScoreRows; ++r) {
    // A row past the end re-reads the last row; its result is not stored.
    const int64_t row = row0 + r < n_blocks ? row0 + r : n_blocks - 1;
    p_k[r] = kbar + row * kbar_stride;
  }
  const TX* p_x = x + t0 * x_stride;

  float acc[kScoreRows][kScoreTokens];
#pragma unroll
  for (int r = 0; r < kScoreRows; ++r)
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) acc[r][t] = 0.f;

#pragma unroll 2
  for (int64_t c = c_begin + static_cast<int64_t>(lane) * VEC; c < c_vec_end;
       c += static_cast<int64_t>(kWarp) * VEC) {
    float b_k[kScoreRows][VEC];  // [R, VEC]
#pragma unroll
    for (int r = 0; r < kScoreRows; ++r) load_vec<float, VEC>(p_k[r] + c, b_k[r]);
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) {
      if (t < nt) {
        float b_x[VEC];
        load_vec<TX, VEC>(p_x + t * x_stride + c, b_x);
#pragma unroll
        for (int r = 0; r < kScoreRows; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][t] = fmaf(b_k[r][e], b_x[e], acc[r][t]);
      }
    }
  }
  for (int64_t c = c_vec_end + lane; c < c_end; c += kWarp) {
    float b_k[kScoreRows];
#pragma unroll
    for (int r = 0; r < kScoreRows; ++r) b_k[r] = __ldg(p_k[r] + c);
#pragma unroll
    for (int t = 0; t < kScoreTokens; ++t) {
      if (t < nt) {
        const float b_x = to_float(p_x[t * x_stride + c]);
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
  if (t < nt && row0 + r < n_blocks) {
    part[(static_cast<int64_t>(blockIdx.y) * T + t0 + t) * n_blocks + row0 + r] = v[0];
  }
}

constexpr int kTopkThreads = 512;

// Order-preserving key: larger key <=> larger score, then smaller block index.
__device__ __forceinline__ unsigned long long make_key(float s, int64_t b) {
  if (s != s) s = __uint_as_float(0x7fc00000u);  // every NaN -> the canonical quiet NaN
  if (s == 0.f) s = 0.f;                          // -0 -> +0: equal scores, equal bits
  uint32_t u = __float_as_uint(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<unsigned long long>(u) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(b));
}

// keys (T, n_blocks) and sel (T, top_k) are per-token scratch in global memory: written and read
// back inside this CTA only (never through the read-only cache).
__global__ void __launch_bounds__(kTopkThreads)
    decode_topk_kernel(const float* __restrict__ part, int64_t n_slices,
                       const float* __restrict__ bbar, int64_t T, int64_t n_blocks,
                       int64_t top_k, unsigned long long* keys, unsigned long long* sel,
                       int32_t* __restrict__ out, int64_t out_stride) {
  __shared__ unsigned int s_hist[256];
  __shared__ unsigned int s_digit;
  __shared__ unsigned int s_krem;
  __shared__ int s_full;
  __shared__ unsigned int s_count;

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int64_t t = blockIdx.x;
  unsigned long long* p_keys = keys + t * n_blocks;
  unsigned long long* p_sel = sel + t * top_k;
  if (tid == 0) s_count = 0;

  // Each thread owns blocks tid, tid + 512, ...: it writes and re-reads only its own keys.
  for (int64_t b = tid; b < n_blocks; b += kTopkThreads) {
    float s = 0.f;
    for (int64_t i = 0; i < n_slices; ++i) s += part[(i * T + t) * n_blocks + b];
    if (bbar != nullptr) s += bbar[b];
    p_keys[b] = make_key(s, b);
  }

  // MSD radix select of the top_k-th largest key, 8 bits at a time.
  unsigned long long prefix = 0;
  unsigned int k_rem = static_cast<unsigned int>(top_k);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kTopkThreads) s_hist[i] = 0;
    __syncthreads();
    const unsigned long long hi_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int64_t b = tid; b < n_blocks; b += kTopkThreads) {
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
          s_digit = static_cast<unsigned int>(lane * 8 + i);
          s_krem = k_rem - above;
          s_full = c[i] == k_rem - above;
        }
        above += c[i];
      }
    }
    __syncthreads();
    prefix |= static_cast<unsigned long long>(s_digit) << shift;
    k_rem = s_krem;
    if (s_full) break;  // the whole bin is taken: the top_k keys are exactly those >= prefix
  }

  // Gather the top_k keys (any order), then write each at its rank.
  for (int64_t b = tid; b < n_blocks; b += kTopkThreads) {
    const unsigned long long k = p_keys[b];
    if (k >= prefix) p_sel[atomicAdd(&s_count, 1u)] = k;
  }
  __syncthreads();
  for (int64_t i = tid; i < top_k; i += kTopkThreads) {
    const unsigned long long k = p_sel[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < top_k; ++j) rank += p_sel[j] > k;
    out[t * out_stride + rank] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(k));
  }
}

// ---------------------------------------------------------------------------------------------
// (b) gather-GEMV

constexpr int kFfnThreads = 256;
constexpr int kFfnWarps = kFfnThreads / kWarp;
constexpr int kFfnTokens = 8;  // tokens per pass over a block's rows
constexpr int64_t kFfnMinChunkRows = 8;
constexpr int64_t kFfnMaxChunkRows = 1024;  // keeps the h buffer <= 32 KiB of shared memory
constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / kWarp;
constexpr int kCombineCols = 4 * kWarp;  // columns per combine CTA

// minBlocksPerSM: 2 for 16-bit inputs (the decode case) keeps two CTAs (16 warps) per SM for
// latency hiding, i.e. <= 128 registers; fp32's 8 x 4 accumulators + 16-byte loads need more,
// so it gets 1. (Without a minimum, ptxas held the scalar instantiations at 64 and spilled.)
template <typename TX, int VEC>
__global__ void __launch_bounds__(kFfnThreads, sizeof(TX) == 4 ? 1 : 2)
    decode_ffn_blocks_kernel(const TX* __restrict__ x, int64_t x_stride,
                             const TX* __restrict__ keys, int64_t k_stride,
                             const TX* __restrict__ values, int64_t v_stride,
                             const int32_t* __restrict__ indices, int64_t idx_stride,
                             const TX* __restrict__ key_bias, const float* __restrict__ gates,
                             int64_t gate_stride, int act, int64_t T, int64_t top_k,
                             int64_t n_blocks, int64_t block_size, int64_t d_model,
                             int64_t chunk_rows, int64_t n_chunks, float* __restrict__ ws,
                             int64_t ws_ld) {
  extern __shared__ float s_h[];  // [kFfnTokens, chunk_rows]: gate * act(x . k + b)
  __shared__ int64_t s_tok[kFfnThreads];
  __shared__ int64_t s_slot[kFfnThreads];
  __shared__ float s_w[kFfnThreads];
  __shared__ int s_wcount[kFfnWarps];

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) / n_chunks;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) - slot * n_chunks;
  const int64_t b = indices[(slot / top_k) * idx_stride + slot % top_k];
  if (b < 0 || b >= n_blocks) return;  // uniform over the CTA

  // Only the first slot (row-major) that names block b works on it.
  bool earlier = false;
  for (int64_t e = tid; e < slot; e += kFfnThreads) {
    earlier |= indices[(e / top_k) * idx_stride + e % top_k] == b;
  }
  if (__syncthreads_or(earlier)) return;

  const int64_t row_begin = b * block_size + chunk * chunk_rows;
  const int64_t rem_rows = block_size - chunk * chunk_rows;
  const int nrows = static_cast<int>(rem_rows < chunk_rows ? rem_rows : chunk_rows);
  const int64_t c_vec_end = d_model / VEC * VEC;

  for (int64_t t_base = 0; t_base < T; t_base += kFfnThreads) {
    // The tokens of this tile that chose b, in token order, with summed gates and first slot.
    const int64_t t = t_base + tid;
    bool chose = false;
    float w = 0.f;
    int64_t first_j = 0;
    if (t < T) {
      for (int64_t j = 0; j < top_k; ++j) {
        if (indices[t * idx_stride + j] == b) {
          if (!chose) first_j = j;
          chose = true;
          w += gates != nullptr ? gates[t * gate_stride + j] : 1.f;
        }
      }
    }
    const unsigned ballot = __ballot_sync(kFullMask, chose);
    if (lane == 0) s_wcount[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0;
    int m_tile = 0;
#pragma unroll
    for (int i = 0; i < kFfnWarps; ++i) {
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
      for (int p = 0; p < kFfnTokens; ++p) p_x[p] = x + s_tok[p0 + (p < m ? p : 0)] * x_stride;

      // Phase 1: a warp per key row, h for the m tokens.
      for (int r = warp; r < nrows; r += kFfnWarps) {
        const TX* p_k = keys + (row_begin + r) * k_stride;
        float acc[kFfnTokens];
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p) acc[p] = 0.f;
#pragma unroll 2
        for (int64_t c = static_cast<int64_t>(lane) * VEC; c < c_vec_end;
             c += static_cast<int64_t>(kWarp) * VEC) {
          float b_k[VEC];
          load_vec<TX, VEC>(p_k + c, b_k);
#pragma unroll
          for (int p = 0; p < kFfnTokens; ++p) {
            if (p < m) {
              float b_x[VEC];
              load_vec<TX, VEC>(p_x[p] + c, b_x);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[p] = fmaf(b_k[e], b_x[e], acc[p]);
            }
          }
        }
        for (int64_t c = c_vec_end + lane; c < d_model; c += kWarp) {
          const float b_k = to_float(p_k[c]);
#pragma unroll
          for (int p = 0; p < kFfnTokens; ++p) {
            if (p < m) acc[p] = fmaf(b_k, to_float(p_x[p][c]), acc[p]);
          }
        }
        const float bias = key_bias != nullptr ? to_float(key_bias[row_begin + r]) : 0.f;
        float mine = 0.f;
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p) {
          const float total = warp_sum(acc[p]);
          if (p == lane) mine = total;
        }
        if (lane < m) s_h[lane * chunk_rows + r] = s_w[p0 + lane] * activate(mine + bias, act);
      }
      __syncthreads();

      // Phase 2: a thread per column vector, y_partial[p] = sum_r h[p, r] * v_r.
      for (int64_t c = static_cast<int64_t>(tid) * VEC; c < c_vec_end;
           c += static_cast<int64_t>(kFfnThreads) * VEC) {
        float acc[kFfnTokens][VEC];
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[p][e] = 0.f;
        const TX* p_v = values + row_begin * v_stride + c;
#pragma unroll 4
        for (int r = 0; r < nrows; ++r) {
          float b_v[VEC];
          load_vec<TX, VEC>(p_v + r * v_stride, b_v);
#pragma unroll
          for (int p = 0; p < kFfnTokens; ++p) {
            if (p < m) {
              const float h = s_h[p * chunk_rows + r];
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[p][e] = fmaf(h, b_v[e], acc[p][e]);
            }
          }
        }
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p) {
          if (p < m) store_vec<VEC>(ws + (s_slot[p0 + p] * n_chunks + chunk) * ws_ld + c, acc[p]);
        }
      }
      for (int64_t c = c_vec_end + tid; c < d_model; c += kFfnThreads) {
        float acc[kFfnTokens];
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p) acc[p] = 0.f;
        for (int r = 0; r < nrows; ++r) {
          const float b_v = to_float(values[(row_begin + r) * v_stride + c]);
#pragma unroll
          for (int p = 0; p < kFfnTokens; ++p) {
            if (p < m) acc[p] = fmaf(s_h[p * chunk_rows + r], b_v, acc[p]);
          }
        }
#pragma unroll
        for (int p = 0; p < kFfnTokens; ++p) {
          if (p < m) ws[(s_slot[p0 + p] * n_chunks + chunk) * ws_ld + c] = acc[p];
        }
      }
      __syncthreads();  // s_h is rewritten by the next group
    }
    __syncthreads();  // s_wcount / s_tok are rewritten by the next tile
  }
}

// A CTA per (token, 128 columns): lane l of warp w owns columns 4l..4l+3 of the tile and sums
// (float4 loads) the partials of slots j = w, w + 8, ... over their chunks; the 8 warps' sums
// are then added in warp order. Many independent loads per thread, fixed summation order.
template <typename TX>
__global__ void __launch_bounds__(kCombineThreads)
    decode_ffn_combine_kernel(const float* __restrict__ ws, int64_t ws_ld,
                              const int32_t* __restrict__ indices, int64_t idx_stride,
                              const TX* __restrict__ out_bias, int64_t top_k, int64_t n_blocks,
                              int64_t n_chunks, int64_t d_model, TX* __restrict__ y,
                              int64_t y_stride) {
  extern __shared__ unsigned char s_first[];  // [top_k]: slot j is its block's first in the row
  __shared__ float4 s_part[kCombineWarps][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t t = blockIdx.y;
  const int32_t* p_idx = indices + t * idx_stride;
  for (int64_t j = threadIdx.x; j < top_k; j += kCombineThreads) {
    const int32_t b = p_idx[j];
    bool first = b >= 0 && b < n_blocks;
    for (int64_t i = 0; first && i < j; ++i) first = p_idx[i] != b;
    s_first[j] = first;
  }
  __syncthreads();
  // ws rows are padded to ws_ld (a multiple of 4): the float4 of the last columns is in bounds.
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCombineCols + 4 * lane;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (c < d_model) {
    for (int64_t j = warp; j < top_k; j += kCombineWarps) {
      if (!s_first[j]) continue;
      const float* p = ws + (t * top_k + j) * n_chunks * ws_ld + c;
#pragma unroll 4
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(p + ch * ws_ld));
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
      }
    }
  }
  s_part[warp][lane] = acc;
  __syncthreads();
  if (warp != 0 || c >= d_model) return;
  float r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) {
    const float4 v = s_part[w][lane];
    r[0] += v.x;
    r[1] += v.y;
    r[2] += v.z;
    r[3] += v.w;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (c + e < d_model) {
      const float ob = out_bias != nullptr ? to_float(out_bias[c + e]) : 0.f;
      y[t * y_stride + c + e] = from_float<TX>(r[e] + ob);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

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

struct SelectPlan {
  int64_t n_slices;
  int64_t slice_width;
  size_t part_bytes, keys_bytes, sel_bytes;
  size_t total() const { return part_bytes + keys_bytes + sel_bytes; }
};

SelectPlan plan_select(int64_t T, int64_t n_blocks, int64_t d_model, int64_t top_k, int sms) {
  SelectPlan p{};
  const int64_t row_ctas = ceil_div(n_blocks, kScoreWarps * kScoreRows);
  int64_t slices = ceil_div(2 * static_cast<int64_t>(sms), row_ctas);
  const int64_t max_slices = d_model / kScoreMinSlice > 1 ? d_model / kScoreMinSlice : 1;
  slices = slices < 1 ? 1 : (slices > max_slices ? max_slices : slices);
  const int64_t step = static_cast<int64_t>(kWarp) * kScoreVec;
  p.slice_width = ceil_div(ceil_div(d_model, slices), step) * step;
  p.n_slices = ceil_div(d_model, p.slice_width);
  p.part_bytes = align256(sizeof(float) * static_cast<size_t>(p.n_slices * T * n_blocks));
  p.keys_bytes = align256(sizeof(unsigned long long) * static_cast<size_t>(T * n_blocks));
  p.sel_bytes = align256(sizeof(unsigned long long) * static_cast<size_t>(T * top_k));
  return p;
}

struct FfnPlan {
  int64_t n_chunks, chunk_rows, ws_ld;
  size_t ws_bytes;
};

FfnPlan plan_ffn(int64_t T, int64_t top_k, int64_t block_size, int64_t d_model, int sms) {
  FfnPlan p{};
  const int64_t slots = T * top_k;
  int64_t chunks = slots < sms ? ceil_div(sms, slots) : 1;
  const int64_t max_chunks = ceil_div(block_size, kFfnMinChunkRows);
  chunks = chunks > max_chunks ? max_chunks : chunks;
  p.chunk_rows = ceil_div(block_size, chunks);
  if (p.chunk_rows > kFfnMaxChunkRows) p.chunk_rows = kFfnMaxChunkRows;
  p.n_chunks = ceil_div(block_size, p.chunk_rows);
  p.ws_ld = ceil_div(d_model, 4) * 4;
  p.ws_bytes = align256(sizeof(float) * static_cast<size_t>(slots * p.n_chunks * p.ws_ld));
  return p;
}

template <typename TX>
cudaError_t launch_select(const TX* x, int64_t x_stride, const float* kbar, int64_t kbar_stride,
                          const float* bbar, int64_t T, int64_t n_blocks, int64_t d_model,
                          int64_t top_k, int32_t* out, int64_t out_stride, char* ws,
                          const SelectPlan& plan, cudaStream_t stream) {
  float* part = reinterpret_cast<float*>(ws);
  auto* keys = reinterpret_cast<unsigned long long*>(ws + plan.part_bytes);
  auto* sel = reinterpret_cast<unsigned long long*>(ws + plan.part_bytes + plan.keys_bytes);
  const dim3 grid(static_cast<unsigned>(ceil_div(n_blocks, kScoreWarps * kScoreRows)),
                  static_cast<unsigned>(plan.n_slices),
                  static_cast<unsigned>(ceil_div(T, kScoreTokens)));
  const bool vec = aligned(kbar, 16) && kbar_stride % kScoreVec == 0 &&
                   aligned(x, kScoreVec * static_cast<int64_t>(sizeof(TX))) &&
                   x_stride % kScoreVec == 0;
  if (vec) {
    decode_scores_kernel<TX, kScoreVec><<<grid, kScoreWarps * kWarp, 0, stream>>>(
        x, x_stride, kbar, kbar_stride, T, n_blocks, d_model, plan.slice_width, part);
  } else {
    decode_scores_kernel<TX, 1><<<grid, kScoreWarps * kWarp, 0, stream>>>(
        x, x_stride, kbar, kbar_stride, T, n_blocks, d_model, plan.slice_width, part);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_topk_kernel<<<static_cast<unsigned>(T), kTopkThreads, 0, stream>>>(
      part, plan.n_slices, bbar, T, n_blocks, top_k, keys, sel, out, out_stride);
  return cudaGetLastError();
}

template <typename TX>
cudaError_t launch_ffn(const TX* x, int64_t x_stride, const TX* keys, int64_t k_stride,
                       const TX* values, int64_t v_stride, const int32_t* indices,
                       int64_t idx_stride, const TX* key_bias, const TX* out_bias,
                       const float* gates, int64_t gate_stride, TX* y, int64_t y_stride,
                       int activation, int64_t T, int64_t top_k, int64_t n_blocks,
                       int64_t block_size, int64_t d_model, const FfnPlan& plan, float* ws,
                       cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(TX));
  const bool vec = aligned(x, 16) && aligned(keys, 16) && aligned(values, 16) &&
                   x_stride % kVec == 0 && k_stride % kVec == 0 && v_stride % kVec == 0;
  const dim3 grid(static_cast<unsigned>(T * top_k * plan.n_chunks));
  const size_t smem = sizeof(float) * kFfnTokens * static_cast<size_t>(plan.chunk_rows);
  if (vec) {
    decode_ffn_blocks_kernel<TX, kVec><<<grid, kFfnThreads, smem, stream>>>(
        x, x_stride, keys, k_stride, values, v_stride, indices, idx_stride, key_bias, gates,
        gate_stride, activation, T, top_k, n_blocks, block_size, d_model, plan.chunk_rows,
        plan.n_chunks, ws, plan.ws_ld);
  } else {
    decode_ffn_blocks_kernel<TX, 1><<<grid, kFfnThreads, smem, stream>>>(
        x, x_stride, keys, k_stride, values, v_stride, indices, idx_stride, key_bias, gates,
        gate_stride, activation, T, top_k, n_blocks, block_size, d_model, plan.chunk_rows,
        plan.n_chunks, ws, plan.ws_ld);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 cgrid(static_cast<unsigned>(ceil_div(d_model, kCombineCols)),
                   static_cast<unsigned>(T));
  decode_ffn_combine_kernel<TX><<<cgrid, kCombineThreads, static_cast<size_t>(top_k), stream>>>(
      ws, plan.ws_ld, indices, idx_stride, out_bias, top_k, n_blocks, plan.n_chunks, d_model, y,
      y_stride);
  return cudaGetLastError();
}

}  // namespace

size_t sfnn_decode_select_workspace_bytes(int64_t T, int64_t n_blocks, int64_t d_model,
                                          int64_t top_k, int /*device*/) {
  if (T <= 0 || n_blocks <= 0 || d_model <= 0 || top_k <= 0) return 0;
  return plan_select(T, n_blocks, d_model, top_k, sm_count()).total();
}

cudaError_t sfnn_decode_select(const void* x, int x_dtype, int64_t x_stride, const float* kbar,
                               int64_t kbar_stride, const float* bbar, int64_t T,
                               int64_t n_blocks, int64_t d_model, int64_t top_k, int32_t* out,
                               int64_t out_stride, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (T <= 0 || d_model <= 0 || n_blocks <= 0 || n_blocks > 0x7fffffffLL || top_k < 1 ||
      top_k > n_blocks || T > 65535LL * kScoreTokens || x == nullptr || kbar == nullptr ||
      out == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const SelectPlan plan = plan_select(T, n_blocks, d_model, top_k, sm_count());
  if (workspace_bytes < plan.total() || !aligned(workspace, 256)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  switch (x_dtype) {
    case SFNN_DTYPE_F32:
      return launch_select(static_cast<const float*>(x), x_stride, kbar, kbar_stride, bbar, T,
                           n_blocks, d_model, top_k, out, out_stride, ws, plan, stream);
    case SFNN_DTYPE_F16:
      return launch_select(static_cast<const __half*>(x), x_stride, kbar, kbar_stride, bbar, T,
                           n_blocks, d_model, top_k, out, out_stride, ws, plan, stream);
    case SFNN_DTYPE_BF16:
      return launch_select(static_cast<const __nv_bfloat16*>(x), x_stride, kbar, kbar_stride,
                           bbar, T, n_blocks, d_model, top_k, out, out_stride, ws, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

size_t sfnn_decode_ffn_workspace_bytes(int64_t T, int64_t top_k, int64_t block_size,
                                       int64_t d_model, int /*device*/) {
  if (T <= 0 || top_k <= 0 || block_size <= 0 || d_model <= 0) return 0;
  return plan_ffn(T, top_k, block_size, d_model, sm_count()).ws_bytes;
}

cudaError_t sfnn_decode_ffn(const void* x, int64_t x_stride, const void* keys, int64_t k_stride,
                            const void* values, int64_t v_stride, const int32_t* indices,
                            int64_t idx_stride, const void* key_bias, const void* out_bias,
                            const float* gates, int64_t gate_stride, void* y, int64_t y_stride,
                            int dtype, int activation, int64_t T, int64_t top_k,
                            int64_t n_blocks, int64_t block_size, int64_t d_model,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (T <= 0 || top_k <= 0 || n_blocks <= 0 || n_blocks > 0x7fffffffLL || block_size <= 0 ||
      d_model <= 0 || x == nullptr || keys == nullptr || values == nullptr ||
      indices == nullptr || y == nullptr || workspace == nullptr ||
      activation < SFNN_ACT_RELU || activation > SFNN_ACT_SILU ||
      T * top_k * ceil_div(block_size, kFfnMinChunkRows) > 0x7fffffffLL ||
      T > 65535 || top_k > 48 * 1024) {
    return cudaErrorInvalidValue;
  }
  const FfnPlan plan = plan_ffn(T, top_k, block_size, d_model, sm_count());
  if (workspace_bytes < plan.ws_bytes || !aligned(workspace, 256)) return cudaErrorInvalidValue;
  float* ws = static_cast<float*>(workspace);
#define SFNN_FFN_CALL(TX)                                                                      \
  launch_ffn(static_cast<const TX*>(x), x_stride, static_cast<const TX*>(keys), k_stride,      \
             static_cast<const TX*>(values), v_stride, indices, idx_stride,                    \
             static_cast<const TX*>(key_bias), static_cast<const TX*>(out_bias), gates,        \
             gate_stride, static_cast<TX*>(y), y_stride, activation, T, top_k, n_blocks,       \
             block_size, d_model, plan, ws, stream)
  switch (dtype) {
    case SFNN_DTYPE_F32: return SFNN_FFN_CALL(float);
    case SFNN_DTYPE_F16: return SFNN_FFN_CALL(__half);
    case SFNN_DTYPE_BF16: return SFNN_FFN_CALL(__nv_bfloat16);
    default: return cudaErrorInvalidValue;
  }
#undef SFNN_FFN_CALL
}
