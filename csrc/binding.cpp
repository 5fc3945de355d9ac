// Torch binding of the decoding kernels in decode.cu: argument checks, output and workspace
// allocation, the current CUDA stream, and registration of two ops in the `sfnn` namespace:
//
//   sfnn::decode_select(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor
//   sfnn::decode_ffn(Tensor x, Tensor keys, Tensor values, Tensor indices, Tensor? key_bias,
//                    Tensor? out_bias, Tensor? gates, int block_size, str activation) -> Tensor
//
// The schemas are defined with TORCH_LIBRARY_FRAGMENT so that they share the namespace with the
// ops sfnn/ops.py defines from Python (torch.library.custom_op also registers fragments). Only
// CUDA kernels are registered here; the fake (meta) kernels live in sfnn/cuda_ext.py.
//
// The current stream comes from torch's ABI-stable C shim (aoti_torch_get_current_cuda_stream,
// exported by libtorch_cuda in torch 2.x), not from c10/cuda or ATen/cuda: this file includes
// no torch CUDA header, so it also passes a syntax check against a CPU build of torch (whose
// c10/cuda headers are incomplete). c10::Stream::native_handle() would do too, but only exists
// in recent torch releases.
#include <Python.h>

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "decode.h"

// From torch/csrc/inductor/aoti_torch/c/shim.h, which declares it only under USE_CUDA (returns
// AOTI_TORCH_SUCCESS == 0). Weak, so that a build against CPU-only torch (the emulated test of
// this file) still loads; the CUDA extension links libtorch_cuda, which defines it.
extern "C" __attribute__((weak)) int32_t aoti_torch_get_current_cuda_stream(int32_t device_index,
                                                                           void** ret_stream);

namespace {

cudaStream_t current_cuda_stream(const c10::Device& device) {
  TORCH_CHECK(aoti_torch_get_current_cuda_stream != nullptr,
              "sfnn._C: this torch has no CUDA runtime (aoti_torch_get_current_cuda_stream is "
              "missing); rebuild the extension against a CUDA build of torch");
  void* stream = nullptr;
  const int32_t err = aoti_torch_get_current_cuda_stream(device.index(), &stream);
  TORCH_CHECK(err == 0, "sfnn._C: could not get the current CUDA stream of ", device);
  return static_cast<cudaStream_t>(stream);
}

int dtype_tag(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return SFNN_DTYPE_F32;
    case at::kHalf: return SFNN_DTYPE_F16;
    case at::kBFloat16: return SFNN_DTYPE_BF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return -1;
}

int activation_tag(const std::string& activation) {
  if (activation == "relu") return SFNN_ACT_RELU;
  if (activation == "gelu") return SFNN_ACT_GELU;
  if (activation == "silu") return SFNN_ACT_SILU;
  TORCH_CHECK(false, "sfnn::decode_ffn: activation must be one of 'relu', 'gelu', 'silu', got '",
              activation, "'");
  return -1;
}

void check_on_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// A 2-D tensor whose rows can be walked with a row stride: unit stride along the last dim.
at::Tensor rows_view(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  if (t.size(1) > 1 && t.stride(1) != 1) return t.contiguous();
  if (t.size(0) > 1 && t.stride(0) < t.size(1)) return t.contiguous();
  return t;
}

// A single row's stride is never multiplied by a nonzero row index: report 0, which keeps the
// kernels' alignment checks (stride % vector width) from rejecting it.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor decode_select(const at::Tensor& x_in, const at::Tensor& kbar_in,
                         const std::optional<at::Tensor>& bbar_in, int64_t top_k) {
  constexpr const char* op = "sfnn::decode_select";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  const at::Tensor x = rows_view(x_in, op, "x");
  const int x_dtype = dtype_tag(x, op, "x");
  check_on_device(kbar_in, x, op, "kbar");
  TORCH_CHECK(kbar_in.scalar_type() == at::kFloat, op, ": kbar must be float32, got ",
              kbar_in.scalar_type());
  const at::Tensor kbar = rows_view(kbar_in, op, "kbar");
  const int64_t T = x.size(0);
  const int64_t d_model = x.size(1);
  const int64_t n_blocks = kbar.size(0);
  TORCH_CHECK(kbar.size(1) == d_model, op, ": kbar must be (n_blocks, d_model=", d_model,
              "), got shape ", kbar.sizes());
  TORCH_CHECK(n_blocks >= 1, op, ": kbar has no blocks");
  TORCH_CHECK(top_k >= 1 && top_k <= n_blocks, op, ": top_k must be in [1, n_blocks=", n_blocks,
              "], got ", top_k);
  at::Tensor bbar;
  if (bbar_in.has_value()) {
    check_on_device(*bbar_in, x, op, "bbar");
    TORCH_CHECK(bbar_in->scalar_type() == at::kFloat, op, ": bbar must be float32, got ",
                bbar_in->scalar_type());
    TORCH_CHECK(bbar_in->dim() == 1 && bbar_in->size(0) == n_blocks, op,
                ": bbar must be (n_blocks=", n_blocks, ",), got shape ", bbar_in->sizes());
    bbar = bbar_in->contiguous();
  }
  TORCH_CHECK(d_model >= 1, op, ": d_model must be >= 1, got x of shape ", x.sizes());
  at::Tensor out = at::empty({T, top_k}, x.options().dtype(at::kInt));
  if (T == 0) return out;
  const c10::DeviceGuard guard(x.device());
  const size_t ws_bytes = sfnn_decode_select_workspace_bytes(T, n_blocks, d_model, top_k,
                                                             x.get_device());
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_launch(
      sfnn_decode_select(x.data_ptr(), x_dtype, row_stride(x), kbar.data_ptr<float>(),
                         row_stride(kbar), bbar.defined() ? bbar.data_ptr<float>() : nullptr, T,
                         n_blocks, d_model, top_k, out.data_ptr<int32_t>(), out.stride(0),
                         ws.data_ptr(), ws_bytes, current_cuda_stream(x.device())),
      op);
  return out;
}

at::Tensor decode_ffn(const at::Tensor& x_in, const at::Tensor& keys_in,
                      const at::Tensor& values_in, const at::Tensor& indices_in,
                      const std::optional<at::Tensor>& key_bias_in,
                      const std::optional<at::Tensor>& out_bias_in,
                      const std::optional<at::Tensor>& gates_in, int64_t block_size,
                      c10::string_view activation) {
  constexpr const char* op = "sfnn::decode_ffn";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  const at::Tensor x = rows_view(x_in, op, "x");
  const int dtype = dtype_tag(x, op, "x");
  const int act = activation_tag(std::string(activation.data(), activation.size()));
  const int64_t T = x.size(0);
  const int64_t d_model = x.size(1);
  for (const at::Tensor* t : {&keys_in, &values_in}) {
    const char* name = t == &keys_in ? "keys" : "values";
    check_on_device(*t, x, op, name);
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(1) == d_model, op, ": ", name,
                " must be (d_ff, d_model=", d_model, "), got shape ", t->sizes());
  }
  const at::Tensor keys = rows_view(keys_in, op, "keys");
  const at::Tensor values = rows_view(values_in, op, "values");
  const int64_t d_ff = keys.size(0);
  TORCH_CHECK(values.size(0) == d_ff, op, ": keys and values must have the same shape, got ",
              keys.sizes(), " and ", values.sizes());
  TORCH_CHECK(block_size >= 1 && d_ff % block_size == 0, op, ": block_size=", block_size,
              " must be >= 1 and divide d_ff=", d_ff);
  const int64_t n_blocks = d_ff / block_size;
  check_on_device(indices_in, x, op, "indices");
  TORCH_CHECK(indices_in.scalar_type() == at::kInt, op, ": indices must be int32, got ",
              indices_in.scalar_type());
  const at::Tensor indices = rows_view(indices_in, op, "indices");
  TORCH_CHECK(indices.size(0) == T, op, ": indices must be (T=", T, ", top_k), got shape ",
              indices.sizes());
  const int64_t top_k = indices.size(1);
  at::Tensor key_bias, out_bias, gates;
  if (key_bias_in.has_value()) {
    check_on_device(*key_bias_in, x, op, "key_bias");
    TORCH_CHECK(key_bias_in->scalar_type() == x.scalar_type(), op,
                ": key_bias must have x's dtype ", x.scalar_type(), ", got ",
                key_bias_in->scalar_type());
    TORCH_CHECK(key_bias_in->dim() == 1 && key_bias_in->size(0) == d_ff, op,
                ": key_bias must be (d_ff=", d_ff, ",), got shape ", key_bias_in->sizes());
    key_bias = key_bias_in->contiguous();
  }
  if (out_bias_in.has_value()) {
    check_on_device(*out_bias_in, x, op, "out_bias");
    TORCH_CHECK(out_bias_in->scalar_type() == x.scalar_type(), op,
                ": out_bias must have x's dtype ", x.scalar_type(), ", got ",
                out_bias_in->scalar_type());
    TORCH_CHECK(out_bias_in->dim() == 1 && out_bias_in->size(0) == d_model, op,
                ": out_bias must be (d_model=", d_model, ",), got shape ", out_bias_in->sizes());
    out_bias = out_bias_in->contiguous();
  }
  if (gates_in.has_value()) {
    check_on_device(*gates_in, x, op, "gates");
    TORCH_CHECK(gates_in->scalar_type() == at::kFloat, op, ": gates must be float32, got ",
                gates_in->scalar_type());
    TORCH_CHECK(gates_in->dim() == 2 && gates_in->size(0) == T && gates_in->size(1) == top_k,
                op, ": gates must be (T=", T, ", top_k=", top_k, "), got shape ",
                gates_in->sizes());
    gates = rows_view(*gates_in, op, "gates");
  }
  at::Tensor y = at::empty({T, d_model}, x.options());
  if (T == 0 || d_model == 0) return y;
  if (top_k == 0) {
    // No block selected: y is out_bias (or 0) for every token.
    return out_bias.defined() ? out_bias.unsqueeze(0).expand({T, d_model}).contiguous()
                              : y.zero_();
  }
  const c10::DeviceGuard guard(x.device());
  const size_t ws_bytes =
      sfnn_decode_ffn_workspace_bytes(T, top_k, block_size, d_model, x.get_device());
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  check_launch(
      sfnn_decode_ffn(x.data_ptr(), row_stride(x), keys.data_ptr(), row_stride(keys),
                      values.data_ptr(), row_stride(values), indices.data_ptr<int32_t>(),
                      row_stride(indices), key_bias.defined() ? key_bias.data_ptr() : nullptr,
                      out_bias.defined() ? out_bias.data_ptr() : nullptr,
                      gates.defined() ? gates.data_ptr<float>() : nullptr,
                      gates.defined() ? row_stride(gates) : 0, y.data_ptr(), y.stride(0), dtype,
                      act, T, top_k, n_blocks, block_size, d_model, ws.data_ptr(), ws_bytes,
                      current_cuda_stream(x.device())),
      op);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sfnn, m) {
  m.def("decode_select(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor");
  m.def(
      "decode_ffn(Tensor x, Tensor keys, Tensor values, Tensor indices, Tensor? key_bias, "
      "Tensor? out_bias, Tensor? gates, int block_size, str activation) -> Tensor");
}

TORCH_LIBRARY_IMPL(sfnn, CUDA, m) {
  m.impl("decode_select", &decode_select);
  m.impl("decode_ffn", &decode_ffn);
}

// `import sfnn._C` only has to load the library (which runs the registrations above).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
