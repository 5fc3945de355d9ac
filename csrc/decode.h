// Decoding kernels for the Avg-K block-sparse FFN: plain CUDA launchers, no torch header.
//
// Everything here works on raw device pointers, element strides (int64), dtype tags and a
// cudaStream_t, and returns a cudaError_t: cudaErrorInvalidValue for bad arguments (then
// sfnn_decode_last_error() says which argument or limit), else the launch error. Nothing
// allocates and nothing synchronises with the host: the caller passes a device workspace of the
// size the matching *_workspace_bytes() function returns, so the calls can be captured in a CUDA
// graph. Each call is one cudaMemsetAsync (16 bytes of the workspace) and one kernel launch.
// See decode.cu for the kernel design.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

// Element type of x / keys / values / key_bias / out_bias / y, and of the block means kbar.
enum SfnnDType : int {
  SFNN_DTYPE_F32 = 0,
  SFNN_DTYPE_F16 = 1,
  SFNN_DTYPE_BF16 = 2,
};

enum SfnnActivation : int {
  SFNN_ACT_RELU = 0,
  SFNN_ACT_GELU = 1,  // exact, erf form
  SFNN_ACT_SILU = 2,
};

// Limits every launcher checks (a call past one fails with cudaErrorInvalidValue and
// sfnn_decode_last_error() names it). Also: n_blocks <= INT32_MAX (int32 indices) and the
// launch's thread blocks (about T * top_k * row chunks, plus scoring) <= INT32_MAX.
#define SFNN_DECODE_MAX_TOKENS 65535  // the kernels serve decoding: per-CTA scans are O(T * top_k)

// C linkage: the launchers can be called from C or through ctypes (the tests do, on a CPU build).
#ifdef __cplusplus
extern "C" {
#endif

// Why the last call on this host thread returned cudaErrorInvalidValue (argument checks) or a
// launch error, "" after a successful call. The text stays valid until the next call.
const char* sfnn_decode_last_error(void);

// (a) Avg-K scoring + top-K for a few tokens.
//
//   scores[t, b] = x[t] . kbar[b] + bbar[b]   (fp32 accumulation)
//   out[t, :]    = the top_k blocks of largest score, best first, ties -> smaller block index
//
// x: (T, d_model) of x_dtype, row stride x_stride; kbar: (n_blocks, d_model) of kbar_dtype
// (SFNN_DTYPE_F32 or SFNN_DTYPE_BF16: a bf16 cache halves its bytes), row stride kbar_stride;
// bbar: (n_blocks,) float32 contiguous or nullptr; out: (T, top_k) int32, row stride out_stride.
// Unit stride along d_model everywhere. Requires 1 <= top_k <= n_blocks.
// A token whose scores are NaN still gets top_k valid, distinct indices (NaN ranks above +inf,
// as in torch.sort; equal NaNs fall back to the smaller index).
size_t sfnn_decode_select_workspace_bytes(int64_t T, int64_t n_blocks, int64_t d_model,
                                          int64_t top_k, int device);

cudaError_t sfnn_decode_select(const void* x, int x_dtype, int64_t x_stride, const void* kbar,
                               int kbar_dtype, int64_t kbar_stride, const float* bbar, int64_t T,
                               int64_t n_blocks, int64_t d_model, int64_t top_k, int32_t* out,
                               int64_t out_stride, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// (b) Gather-GEMV over the given blocks (forward only):
//
//   y[t] = sum_j gates[t, j] * sum_{i in block indices[t, j]} act(x[t] . keys[i] + key_bias[i])
//          * values[i] + out_bias
//
// x: (T, d_model), keys/values: (n_blocks * block_size, d_model), y: (T, d_model), all of dtype;
// key_bias: (n_blocks * block_size,) and out_bias: (d_model,) of dtype, contiguous, or nullptr;
// indices: (T, top_k) int32, row stride idx_stride; gates: (T, top_k) float32, row stride
// gate_stride, or nullptr (every gate 1). A block chosen in two slots of a row counts twice.
// Indices outside [0, n_blocks) are skipped (the op layer validates them).
size_t sfnn_decode_ffn_workspace_bytes(int64_t T, int64_t top_k, int64_t block_size,
                                       int64_t d_model, int device);

cudaError_t sfnn_decode_ffn(const void* x, int64_t x_stride, const void* keys, int64_t k_stride,
                            const void* values, int64_t v_stride, const int32_t* indices,
                            int64_t idx_stride, const void* key_bias, const void* out_bias,
                            const float* gates, int64_t gate_stride, void* y, int64_t y_stride,
                            int dtype, int activation, int64_t T, int64_t top_k,
                            int64_t n_blocks, int64_t block_size, int64_t d_model,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream);

// (b') The gated FFN's gather-GEMV (forward only), as (b) with
//
//   act(x[t] . keys[i] + key_bias[i])  replaced by
//   act(x[t] . gate_keys[i] + gate_bias[i]) * (x[t] . keys[i] + key_bias[i])
//
// gate_keys: (n_blocks * block_size, d_model) of dtype, row stride gk_stride (nullptr: the
// plain FFN of (b)); gate_bias: (n_blocks * block_size,) of dtype, contiguous, or nullptr (an
// error without gate_keys). Workspace as (b) (sfnn_decode_ffn_workspace_bytes).
cudaError_t sfnn_decode_ffn_gated(
    const void* x, int64_t x_stride, const void* keys, int64_t k_stride, const void* values,
    int64_t v_stride, const int32_t* indices, int64_t idx_stride, const void* key_bias,
    const void* out_bias, const float* gates, int64_t gate_stride, void* y, int64_t y_stride,
    int dtype, int activation, int64_t T, int64_t top_k, int64_t n_blocks, int64_t block_size,
    int64_t d_model, void* workspace, size_t workspace_bytes, cudaStream_t stream,
    const void* gate_keys, int64_t gk_stride, const void* gate_bias);

// (a) + (b) in one launch: the decode step of the sparse FFN with cached block means,
//
//   indices = top_k blocks of x . kbar + bbar (as (a));  y = block FFN over them (as (b), no
//   gates).
//
// Arguments as in (a) and (b); n_blocks = kbar's rows = keys' rows / block_size; indices
// (T, top_k) int32 with row stride idx_stride is written as well as y.
size_t sfnn_decode_step_workspace_bytes(int64_t T, int64_t n_blocks, int64_t block_size,
                                        int64_t d_model, int64_t top_k, int device);

cudaError_t sfnn_decode_step(const void* x, int64_t x_stride, const void* kbar, int kbar_dtype,
                             int64_t kbar_stride, const float* bbar, const void* keys,
                             int64_t k_stride, const void* values, int64_t v_stride,
                             const void* key_bias, const void* out_bias, int32_t* indices,
                             int64_t idx_stride, void* y, int64_t y_stride, int dtype,
                             int activation, int64_t T, int64_t n_blocks, int64_t block_size,
                             int64_t d_model, int64_t top_k, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
