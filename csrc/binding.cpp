// Torch binding of the decoding kernels in decode.cu: argument checks, output and workspace
// allocation, the current CUDA stream, and registration of three ops in the `sfnn` namespace:
//
//   sfnn::decode_select(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor
//   sfnn::decode_ffn(Tensor x, Tensor keys, Tensor values, Tensor indices, Tensor? key_bias,
//                    Tensor? out_bias, Tensor? gates, int block_size, str activation,
//                    Tensor? gate_keys=None, Tensor? gate_bias=None) -> Tensor
//                    (with gate_keys: the gated FFN, act(x.kg + bg) * (x.k + b))
//   sfnn::decode_step(Tensor x, Tensor kbar, Tensor? bbar, Tensor keys, Tensor values,
//                     Tensor? key_bias, Tensor? out_bias, int top_k, int block_size,
//                     str activation) -> (Tensor, Tensor)
//
// kbar may be float32 or bfloat16 (a cache of the block means in bf16 halves their bytes); bbar
// is float32. Each call is one memset and one kernel launch on the current stream, with outputs
// and workspace from torch's caching allocator and no host synchronisation, so the calls can be
// captured in a CUDA graph.
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
#include <tuple>
#include <utility>

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

int activation_tag(c10::string_view activation_in, const char* op) {
  const std::string activation(activation_in.data(), activation_in.size());
  if (activation == "relu") return SFNN_ACT_RELU;
  if (activation == "gelu") return SFNN_ACT_GELU;
  if (activation == "silu") return SFNN_ACT_SILU;
  TORCH_CHECK(false, op, ": activation must be one of 'relu', 'gelu', 'silu', got '", activation,
              "'");
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

// A decode op's tokens: a CUDA tensor, as (T, d_model) rows (rows_view).
at::Tensor token_rows(const at::Tensor& x_in, const char* op) {
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  return rows_view(x_in, op, "x");
}

// A single row's stride is never multiplied by a nonzero row index: report 0, which keeps the
// kernels' alignment checks (stride % vector width) from rejecting it.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : 0; }

// A failed call: the launcher's own message when it has one (which argument or limit), else
// the CUDA error.
void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  const char* why = sfnn_decode_last_error();
  TORCH_CHECK(why == nullptr || why[0] == '\0', op, ": ", why);
  TORCH_CHECK(false, op, ": CUDA error: ", cudaGetErrorString(err));
}

// The workspace a call needs; 0 means the sizes are past a limit (the launcher says which).
at::Tensor workspace(size_t bytes, const at::Tensor& x, const char* op) {
  TORCH_CHECK(bytes > 0, op, ": ", sfnn_decode_last_error());
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

// kbar: float32 or bfloat16 rows of d_model, unit stride along d_model.
at::Tensor kbar_rows(const at::Tensor& kbar_in, const at::Tensor& x, int64_t d_model,
                     const char* op) {
  check_on_device(kbar_in, x, op, "kbar");
  TORCH_CHECK(kbar_in.scalar_type() == at::kFloat || kbar_in.scalar_type() == at::kBFloat16, op,
              ": kbar must be float32 or bfloat16, got ", kbar_in.scalar_type());
  const at::Tensor kbar = rows_view(kbar_in, op, "kbar");
  TORCH_CHECK(kbar.size(1) == d_model, op, ": kbar must be (n_blocks, d_model=", d_model,
              "), got shape ", kbar.sizes());
  TORCH_CHECK(kbar.size(0) >= 1, op, ": kbar has no blocks");
  return kbar;
}

at::Tensor bbar_vector(const std::optional<at::Tensor>& bbar_in, const at::Tensor& x,
                       int64_t n_blocks, const char* op) {
  if (!bbar_in.has_value()) return at::Tensor();
  check_on_device(*bbar_in, x, op, "bbar");
  TORCH_CHECK(bbar_in->scalar_type() == at::kFloat, op, ": bbar must be float32, got ",
              bbar_in->scalar_type());
  TORCH_CHECK(bbar_in->dim() == 1 && bbar_in->size(0) == n_blocks, op,
              ": bbar must be (n_blocks=", n_blocks, ",), got shape ", bbar_in->sizes());
  return bbar_in->contiguous();
}

at::Tensor decode_select(const at::Tensor& x_in, const at::Tensor& kbar_in,
                         const std::optional<at::Tensor>& bbar_in, int64_t top_k) {
  constexpr const char* op = "sfnn::decode_select";
  const at::Tensor x = token_rows(x_in, op);
  const int x_dtype = dtype_tag(x, op, "x");
  const int64_t T = x.size(0);
  const int64_t d_model = x.size(1);
  TORCH_CHECK(d_model >= 1, op, ": d_model must be >= 1, got x of shape ", x.sizes());
  const at::Tensor kbar = kbar_rows(kbar_in, x, d_model, op);
  const int64_t n_blocks = kbar.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= n_blocks, op, ": top_k must be in [1, n_blocks=", n_blocks,
              "], got ", top_k);
  const at::Tensor bbar = bbar_vector(bbar_in, x, n_blocks, op);
  at::Tensor out = at::empty({T, top_k}, x.options().dtype(at::kInt));
  if (T == 0) return out;
  const c10::DeviceGuard guard(x.device());
  const at::Tensor ws = workspace(
      sfnn_decode_select_workspace_bytes(T, n_blocks, d_model, top_k, x.get_device()), x, op);
  check_launch(
      sfnn_decode_select(x.data_ptr(), x_dtype, row_stride(x), kbar.data_ptr(),
                         dtype_tag(kbar, op, "kbar"), row_stride(kbar),
                         bbar.defined() ? bbar.data_ptr<float>() : nullptr, T, n_blocks,
                         d_model, top_k, out.data_ptr<int32_t>(), out.stride(0), ws.data_ptr(),
                         static_cast<size_t>(ws.numel()), current_cuda_stream(x.device())),
      op);
  return out;
}

// keys / values: (d_ff, d_model) of x's dtype, unit stride along d_model.
std::pair<at::Tensor, at::Tensor> ffn_tables(const at::Tensor& keys_in,
                                             const at::Tensor& values_in, const at::Tensor& x,
                                             const char* op) {
  const int64_t d_model = x.size(1);
  for (const at::Tensor* t : {&keys_in, &values_in}) {
    const char* name = t == &keys_in ? "keys" : "values";
    check_on_device(*t, x, op, name);
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(1) == d_model, op, ": ", name,
                " must be (d_ff, d_model=", d_model, "), got shape ", t->sizes());
  }
  TORCH_CHECK(values_in.size(0) == keys_in.size(0), op,
              ": keys and values must have the same shape, got ", keys_in.sizes(), " and ",
              values_in.sizes());
  return {rows_view(keys_in, op, "keys"), rows_view(values_in, op, "values")};
}

// An optional 1-D table of x's dtype and length n, contiguous.
at::Tensor bias_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t n,
                       const char* op, const char* name, const char* len) {
  if (!t.has_value()) return at::Tensor();
  check_on_device(*t, x, op, name);
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
              x.scalar_type(), ", got ", t->scalar_type());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must be (", len, "=", n,
              ",), got shape ", t->sizes());
  return t->contiguous();
}

at::Tensor decode_ffn(const at::Tensor& x_in, const at::Tensor& keys_in,
                      const at::Tensor& values_in, const at::Tensor& indices_in,
                      const std::optional<at::Tensor>& key_bias_in,
                      const std::optional<at::Tensor>& out_bias_in,
                      const std::optional<at::Tensor>& gates_in, int64_t block_size,
                      c10::string_view activation,
                      const std::optional<at::Tensor>& gate_keys_in,
                      const std::optional<at::Tensor>& gate_bias_in) {
  constexpr const char* op = "sfnn::decode_ffn";
  const at::Tensor x = token_rows(x_in, op);
  const int dtype = dtype_tag(x, op, "x");
  const int act = activation_tag(activation, op);
  const int64_t T = x.size(0);
  const int64_t d_model = x.size(1);
  const auto [keys, values] = ffn_tables(keys_in, values_in, x, op);
  const int64_t d_ff = keys.size(0);
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
  const at::Tensor key_bias = bias_vector(key_bias_in, x, d_ff, op, "key_bias", "d_ff");
  const at::Tensor out_bias = bias_vector(out_bias_in, x, d_model, op, "out_bias", "d_model");
  TORCH_CHECK(gate_keys_in.has_value() || !gate_bias_in.has_value(), op,
              ": gate_bias without gate_keys");
  at::Tensor gate_keys;
  if (gate_keys_in.has_value()) {
    check_on_device(*gate_keys_in, x, op, "gate_keys");
    TORCH_CHECK(gate_keys_in->scalar_type() == x.scalar_type() &&
                    gate_keys_in->sizes() == keys.sizes(),
                op, ": gate_keys must be like keys (", keys.sizes(), ", ", x.scalar_type(),
                "), got ", gate_keys_in->sizes(), " ", gate_keys_in->scalar_type());
    gate_keys = rows_view(*gate_keys_in, op, "gate_keys");
  }
  const at::Tensor gate_bias = bias_vector(gate_bias_in, x, d_ff, op, "gate_bias", "d_ff");
  at::Tensor gates;
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
  const at::Tensor ws = workspace(
      sfnn_decode_ffn_workspace_bytes(T, top_k, block_size, d_model, x.get_device()), x, op);
  check_launch(
      sfnn_decode_ffn_gated(
          x.data_ptr(), row_stride(x), keys.data_ptr(), row_stride(keys), values.data_ptr(),
          row_stride(values), indices.data_ptr<int32_t>(), row_stride(indices),
          key_bias.defined() ? key_bias.data_ptr() : nullptr,
          out_bias.defined() ? out_bias.data_ptr() : nullptr,
          gates.defined() ? gates.data_ptr<float>() : nullptr,
          gates.defined() ? row_stride(gates) : 0, y.data_ptr(), y.stride(0), dtype, act, T,
          top_k, n_blocks, block_size, d_model, ws.data_ptr(), static_cast<size_t>(ws.numel()),
          current_cuda_stream(x.device()), gate_keys.defined() ? gate_keys.data_ptr() : nullptr,
          gate_keys.defined() ? row_stride(gate_keys) : 0,
          gate_bias.defined() ? gate_bias.data_ptr() : nullptr),
      op);
  return y;
}

std::tuple<at::Tensor, at::Tensor> decode_step(
    const at::Tensor& x_in, const at::Tensor& kbar_in, const std::optional<at::Tensor>& bbar_in,
    const at::Tensor& keys_in, const at::Tensor& values_in,
    const std::optional<at::Tensor>& key_bias_in, const std::optional<at::Tensor>& out_bias_in,
    int64_t top_k, int64_t block_size, c10::string_view activation) {
  constexpr const char* op = "sfnn::decode_step";
  const at::Tensor x = token_rows(x_in, op);
  const int dtype = dtype_tag(x, op, "x");
  const int act = activation_tag(activation, op);
  const int64_t T = x.size(0);
  const int64_t d_model = x.size(1);
  TORCH_CHECK(d_model >= 1, op, ": d_model must be >= 1, got x of shape ", x.sizes());
  const at::Tensor kbar = kbar_rows(kbar_in, x, d_model, op);
  const int64_t n_blocks = kbar.size(0);
  const auto [keys, values] = ffn_tables(keys_in, values_in, x, op);
  const int64_t d_ff = keys.size(0);
  TORCH_CHECK(block_size >= 1 && d_ff == n_blocks * block_size, op, ": keys must have n_blocks ("
              "kbar's rows, ", n_blocks, ") * block_size (", block_size, ") rows, got ", d_ff);
  TORCH_CHECK(top_k >= 1 && top_k <= n_blocks, op, ": top_k must be in [1, n_blocks=", n_blocks,
              "], got ", top_k);
  const at::Tensor bbar = bbar_vector(bbar_in, x, n_blocks, op);
  const at::Tensor key_bias = bias_vector(key_bias_in, x, d_ff, op, "key_bias", "d_ff");
  const at::Tensor out_bias = bias_vector(out_bias_in, x, d_model, op, "out_bias", "d_model");
  at::Tensor y = at::empty({T, d_model}, x.options());
  at::Tensor idx = at::empty({T, top_k}, x.options().dtype(at::kInt));
  if (T == 0) return {y, idx};
  const c10::DeviceGuard guard(x.device());
  const at::Tensor ws = workspace(sfnn_decode_step_workspace_bytes(T, n_blocks, block_size,
                                                                   d_model, top_k, x.get_device()),
                                  x, op);
  check_launch(
      sfnn_decode_step(x.data_ptr(), row_stride(x), kbar.data_ptr(), dtype_tag(kbar, op, "kbar"),
                       row_stride(kbar), bbar.defined() ? bbar.data_ptr<float>() : nullptr,
                       keys.data_ptr(), row_stride(keys), values.data_ptr(), row_stride(values),
                       key_bias.defined() ? key_bias.data_ptr() : nullptr,
                       out_bias.defined() ? out_bias.data_ptr() : nullptr,
                       idx.data_ptr<int32_t>(), idx.stride(0), y.data_ptr(), y.stride(0), dtype,
                       act, T, n_blocks, block_size, d_model, top_k, ws.data_ptr(),
                       static_cast<size_t>(ws.numel()), current_cuda_stream(x.device())),
      op);
  return {y, idx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sfnn, m) {
  m.def("decode_select(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor");
  m.def(
      "decode_ffn(Tensor x, Tensor keys, Tensor values, Tensor indices, Tensor? key_bias, "
      "Tensor? out_bias, Tensor? gates, int block_size, str activation, "
      "Tensor? gate_keys=None, Tensor? gate_bias=None) -> Tensor");
  m.def(
      "decode_step(Tensor x, Tensor kbar, Tensor? bbar, Tensor keys, Tensor values, "
      "Tensor? key_bias, Tensor? out_bias, int top_k, int block_size, str activation) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sfnn, CUDA, m) {
  m.impl("decode_select", &decode_select);
  m.impl("decode_ffn", &decode_ffn);
  m.impl("decode_step", &decode_step);
}

// `import sfnn._C` only has to load the library (which runs the registrations above).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
