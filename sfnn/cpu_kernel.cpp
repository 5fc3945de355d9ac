// The CPU kernel of sfnn's torch backend: the block FFN forward and backward in one parallel
// region per call (plus one to sum the per-task partial outputs), built just in time by
// sfnn/cpu_kernel.py where a C++ compiler is present.
//
// Why: the pure-torch path runs a loop of small ATen ops per selected block, each its own
// OpenMP parallel region with a barrier; on a machine shared with another busy process every
// barrier waits for a descheduled thread, and the path collapses (issue 12). Here the
// (token, slot) pairs are grouped by block once (a counting sort, stable: the same block order
// as the torch path), the blocks are split into contiguous ranges of about equal work, one
// task per thread, and each task runs its blocks alone: gather the tokens' rows, GEMM with the
// block's key rows, activation, GEMM with its value rows, add into the task's own fp32 (fp64
// for fp64) output rows. The GEMMs and activations are ATen ops called inside the parallel
// region, where ATen and MKL run them on the calling thread. Threads claim tasks as they come
// (a thread the OS deschedules before it claims one leaves its task to the others);
// a second region sums the tasks' partial outputs in task order. A task's blocks and
// accumulator do not depend on which thread ran it, so the results are bitwise repeatable run
// to run for a given thread count.
//
// Shapes as in sfnn/ops.py's backend protocol: x (T, d_model), keys / values (d_ff, d_model),
// indices int32 (T, top_k) in [0, n_blocks), key_bias (d_ff,), out_bias (d_model,), gates
// (T, top_k) in the accumulation dtype; saved pre-activations (T * top_k, g) in block order.
// A gated FFN (gate_keys (d_ff, d_model), gate_bias (d_ff,)) computes act(x kg^T + bg) *
// (x k^T + b) and saves [A_gate | A_up], (T * top_k, 2 g) (PLAN.md's gated protocol).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The BLAS and OpenMP runtimes torch itself uses, when present (weak: a torch without MKL or
// OpenMP still loads this library). See WorkerScope. MKL's C entry point is the mixed-case
// name (mkl_service.h maps mkl_set_num_threads_local to it; the lower-case symbol is the Fortran
// one, which takes a pointer).
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int n);
extern "C" __attribute__((weak)) void omp_set_num_threads(int n);
extern "C" __attribute__((weak)) int omp_get_max_threads(void);

namespace {

// What a thread of the kernel's parallel regions needs before it calls ATen ops. (1) They must
// run on the calling thread. ATen's own parallel_for does, but torch turns MKL's dynamic
// threading off (mkl_set_dynamic(0)), so an MKL GEMM called there would fork a nested team of
// torch's thread count, and oneDNN sizes its teams from OpenMP's nthreads: one fork/join (and,
// under contention, a wait for a descheduled thread) per GEMM, the very cost the kernel exists
// to avoid. Both run single-threaded on this thread for the scope's lifetime, and both settings
// are restored (libgomp keeps the master thread's setting after the region:
// torch.get_num_threads() reads it). (2) They must not see autograd: the op runs below it, but
// dispatch state is thread-local and OpenMP's worker threads start with autograd on, where an
// out= GEMM on a parameter that requires grad raises.
class WorkerScope {
 public:
  WorkerScope() {
    if (omp_set_num_threads != nullptr && omp_get_max_threads != nullptr) {
      omp_previous_ = omp_get_max_threads();
      omp_set_num_threads(1);
    }
    if (MKL_Set_Num_Threads_Local != nullptr) mkl_previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~WorkerScope() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_previous_);
    if (omp_previous_ > 0) omp_set_num_threads(omp_previous_);
  }
  WorkerScope(const WorkerScope&) = delete;
  WorkerScope& operator=(const WorkerScope&) = delete;

 private:
  const at::AutoDispatchBelowADInplaceOrView below_autograd_;
  int omp_previous_ = 0;
  int mkl_previous_ = 0;  // 0: back to MKL's global setting
};

// Extra per-task accumulators are capped at this many bytes (or twice y's, if larger): beyond
// it fewer tasks run (each task owns a (T, d_model) accumulator).
constexpr int64_t kAccBudgetBytes = int64_t{512} << 20;
// A block's fixed cost in units of one token row, for balancing the tasks' work.
constexpr int64_t kBlockOverheadRows = 8;
// Tasks per thread. More would balance a descheduled thread at a finer grain, but each is one
// more (T, d_model) accumulator to zero and sum: at the acceptance shape two per thread were 6%
// slower idle and no faster with one busy process beside them (side by side, one process).
constexpr int64_t kTasksPerThread = 1;

enum class Act { kRelu, kGelu, kSilu };

Act parse_activation(const std::string& a) {
  if (a == "relu") return Act::kRelu;
  if (a == "gelu") return Act::kGelu;
  if (a == "silu") return Act::kSilu;
  TORCH_CHECK_VALUE(false, "activation must be one of 'relu', 'gelu', 'silu', got '", a, "'");
  return Act::kRelu;
}

// out = act(pre); out may be pre.
void activate(at::Tensor& out, const at::Tensor& pre, Act act) {
  switch (act) {
    case Act::kRelu: at::clamp_min_out(out, pre, 0); break;  // NaN stays NaN, as F.relu
    case Act::kGelu: at::gelu_out(out, pre, "none"); break;
    case Act::kSilu: at::silu_out(out, pre); break;
  }
}

// da = dh * act'(pre)
void activate_backward(at::Tensor& da, const at::Tensor& dh, const at::Tensor& pre, Act act) {
  switch (act) {
    case Act::kRelu: at::threshold_backward_out(da, dh, pre, 0); break;
    case Act::kGelu: at::gelu_backward_out(da, dh, pre, "none"); break;
    case Act::kSilu: at::silu_backward_out(da, dh, pre); break;
  }
}

// The (token, slot) pairs p = t * top_k + j grouped by block, stable (the torch path's argsort
// order): block b's pairs are pair[offset[b] .. offset[b + 1]).
struct Routing {
  std::vector<int64_t> offset;
  std::vector<int64_t> pair;
};

Routing route(const at::Tensor& indices, int64_t n_blocks) {
  const int64_t n = indices.numel();
  const int32_t* idx = indices.data_ptr<int32_t>();
  Routing r;
  r.offset.assign(static_cast<size_t>(n_blocks + 1), 0);
  for (int64_t p = 0; p < n; ++p) {
    const int64_t b = idx[p];
    TORCH_CHECK_VALUE(b >= 0 && b < n_blocks, "indices must lie in [0, ", n_blocks, "); got ", b);
    ++r.offset[static_cast<size_t>(b + 1)];
  }
  for (int64_t b = 0; b < n_blocks; ++b) r.offset[b + 1] += r.offset[b];
  std::vector<int64_t> fill(r.offset.begin(), r.offset.end() - 1);
  r.pair.resize(static_cast<size_t>(n));
  for (int64_t p = 0; p < n; ++p) r.pair[fill[idx[p]]++] = p;
  return r;
}

// tasks + 1 block boundaries: contiguous block ranges of about equal work (pairs + overhead).
std::vector<int64_t> partition(const Routing& r, int64_t n_blocks, int64_t tasks) {
  // A block nobody chose costs next to nothing (a backward zeroes its gradient rows): counting
  // the overhead for it too would split a decode step's few chosen blocks unevenly.
  auto cost_of = [&](int64_t b) {
    const int64_t n = r.offset[b + 1] - r.offset[b];
    return n > 0 ? n + kBlockOverheadRows : int64_t{1};
  };
  int64_t total = 0;
  for (int64_t b = 0; b < n_blocks; ++b) total += cost_of(b);
  std::vector<int64_t> bounds(static_cast<size_t>(tasks + 1), n_blocks);
  bounds[0] = 0;
  int64_t b = 0, cost = 0;
  for (int64_t i = 1; i < tasks; ++i) {
    const int64_t target = total * i / tasks;
    while (b < n_blocks && cost + cost_of(b) <= target) cost += cost_of(b++);
    bounds[i] = b;
  }
  return bounds;
}

int64_t num_tasks(int64_t n_blocks, int64_t acc_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t budget = std::max(kAccBudgetBytes, 2 * acc_bytes);
  const int64_t by_memory = 1 + budget / std::max<int64_t>(acc_bytes, 1);
  return std::max<int64_t>(1, std::min({kTasksPerThread * threads, n_blocks, by_memory}));
}

// task_fn(task) for every task in [0, tasks), in one parallel region: each thread claims the
// next unclaimed task until none is left.
template <typename F>
void run_tasks(int64_t tasks, const F& task_fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(tasks, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const WorkerScope scope;
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      task_fn(task);
    }
  });
}

// One (T, d_model) accumulator per task in the accumulation dtype; the first is `out` itself
// when it has that dtype (the sum of the parts is then written over it in place).
std::vector<at::Tensor> task_accumulators(const at::Tensor& out, int64_t tasks,
                                          at::ScalarType acc_t) {
  std::vector<at::Tensor> acc(static_cast<size_t>(tasks));
  for (size_t i = 0; i < acc.size(); ++i) {
    acc[i] = i == 0 && out.scalar_type() == acc_t ? out : at::empty(out.sizes(),
                                                                    out.options().dtype(acc_t));
  }
  return acc;
}

// Token rows per pass over a block: the gathered rows and the block's output rows of a pass
// (2 x rows x d_model elements) take about 1 MiB, the L2 of a core on the machines we measure
// (half of it cost 10% more time at the acceptance shape: MKL's small-M GEMMs run slower).
int64_t chunk_rows(int64_t d, int64_t elt) {
  return std::clamp<int64_t>(int64_t{1024 * 1024} / (2 * d * elt), 32, 512);
}

// rows[i] = src[tok[i]] for the n pairs' tokens (row-contiguous tensors).
void gather_rows(at::Tensor& dst, const at::Tensor& src, const int64_t* pairs, int64_t n,
                 int64_t top_k) {
  const int64_t row = src.size(1) * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  for (int64_t i = 0; i < n; ++i) std::memcpy(d + i * row, s + (pairs[i] / top_k) * row, row);
}

// acc[tok[i]] += scale_i * src[i] over the n pairs (scale 1 without gates).
template <typename T, typename A>
void scatter_add_rows(A* acc, const T* src, const int64_t* pairs, int64_t n, int64_t top_k,
                      int64_t d, const A* gates) {
  for (int64_t i = 0; i < n; ++i) {
    A* __restrict__ dst = acc + (pairs[i] / top_k) * d;
    const T* __restrict__ s = src + i * d;
    if (gates != nullptr) {
      const A g = gates[pairs[i]];
      for (int64_t c = 0; c < d; ++c) dst[c] += g * static_cast<A>(s[c]);
    } else {
      for (int64_t c = 0; c < d; ++c) dst[c] += static_cast<A>(s[c]);
    }
  }
}

// out[t] = cast(sum_task acc[task][t] + out_bias) for t in [t0, t1).
template <typename T, typename A>
void reduce_rows(T* out, const std::vector<A*>& acc, const T* out_bias, int64_t t0, int64_t t1,
                 int64_t d) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < d; ++c) {
      A v = acc[0][t * d + c];
      for (size_t i = 1; i < acc.size(); ++i) v += acc[i][t * d + c];
      if (out_bias != nullptr) v += static_cast<A>(out_bias[c]);
      out[t * d + c] = static_cast<T>(v);
    }
  }
}

// out = the tasks' accumulators summed in task order (+ out_bias if defined), in a parallel
// region over token rows; out may be acc[0] itself (task_accumulators).
void sum_accumulators(at::Tensor& out, const std::vector<at::Tensor>& acc,
                      const at::Tensor& out_bias) {
  const int64_t T = out.size(0), d = out.size(1);
  at::parallel_for(0, T, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)),
                   [&](int64_t t0, int64_t t1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sfnn_sum", [&] {
      using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      std::vector<A*> parts;
      for (const auto& a : acc) parts.push_back(a.data_ptr<A>());
      reduce_rows<scalar_t, A>(out.data_ptr<scalar_t>(), parts,
                               out_bias.defined() ? out_bias.data_ptr<scalar_t>() : nullptr, t0,
                               t1, d);
    });
  });
}

// ---- blocks chosen by a few tokens (decoding): fused loops instead of ATen's small GEMMs, so
// a block costs one pass over its key rows and one over its value rows and nothing else.

constexpr int64_t kGemvGroup = 4;      // token rows per pass over a block's rows
constexpr int64_t kGemvMaxRows = 8;    // blocks with more pairs go through ATen's GEMMs
constexpr int kLanes = 16;             // partial sums per (key row, token) dot product
constexpr int64_t kFewTokenRows = 16;  // selections of at most this many tokens split by block

// Key / value rows per step for N token rows: R * N * kLanes independent partial sums (one
// chain per dot product would wait on the FMA latency, not the loads), each x / y element
// loaded once per R rows; fewer rows for more tokens keep the sums in registers.
template <int N>
constexpr int kGemvRows = N == 1 ? 8 : N == 2 ? 4 : 2;

template <typename A>
A activate_scalar(A a, Act act) {
  if (act == Act::kRelu) return a < A(0) ? A(0) : a;  // NaN passes through
  if (act == Act::kGelu) return A(0.5) * a * (A(1) + std::erf(a * A(0.70710678118654752440)));
  return a / (A(1) + std::exp(-a));
}

// out[j][i] = k_j . x_i for the R key rows k_j = k + j * d and the N token rows x_i = x + i * d
// (already in A: converting them here, once per key row, cost more than the dot products).
template <int R, int N, typename T, typename A>
void dot_rows(const T* k, const A* x, int64_t d, A (&out)[R][N]) {
  A acc[R][N][kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    A xv[N][kLanes];
    for (int i = 0; i < N; ++i)
      for (int l = 0; l < kLanes; ++l) xv[i][l] = x[i * d + c + l];
    for (int j = 0; j < R; ++j) {
      A kv[kLanes];
      for (int l = 0; l < kLanes; ++l) kv[l] = static_cast<A>(k[j * d + c + l]);
      for (int i = 0; i < N; ++i)
        for (int l = 0; l < kLanes; ++l) acc[j][i][l] += kv[l] * xv[i][l];
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < N; ++i) {
      // A tree over the lanes: a few vector adds instead of 15 dependent scalar ones per row.
      A* lanes = acc[j][i];
      for (int w = kLanes / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
      A s = lanes[0];
      for (int64_t cc = c; cc < d; ++cc) {
        s += static_cast<A>(k[j * d + cc]) * x[i * d + cc];
      }
      out[j][i] = s;
    }
  }
}

// y[i] += h[j][i] * v_j for the R value rows v_j = v + j * d, j in order, and the N rows y[i].
template <int R, int N, typename T, typename A>
void axpy_rows(A* const* y, const A (&h)[R][N], const T* v, int64_t d) {
  for (int64_t c = 0; c < d; ++c) {
    A vc[R];
    for (int j = 0; j < R; ++j) vc[j] = static_cast<A>(v[j * d + c]);
    for (int i = 0; i < N; ++i) {
      A s = y[i][c];
      for (int j = 0; j < R; ++j) s += h[j][i] * vc[j];
      y[i][c] = s;
    }
  }
}

// How far ahead of its use a decoded block's rows are prefetched.
constexpr int64_t kPrefetchBytes = 8 * 1024;

// Prefetch rows [r0, r0 + n) of each table (row length d; a null table is skipped).
template <typename T>
void prefetch_rows(const T* const (&tables)[3], int64_t r0, int64_t n, int64_t d) {
  const int64_t bytes = n * d * static_cast<int64_t>(sizeof(T));
  for (const T* t : tables) {
    if (t == nullptr) continue;
    const char* p = reinterpret_cast<const char*>(t + r0 * d);
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
  }
}

// Rows [r, r + R) of block b for the N token rows: h[j][i] = gate_i * act(x_i . k + bias), or
// gated gate_i * act(x_i . kg + bg) (x_i . k + bias), rounded through T as the GEMM path's
// activations are; saved rows (if any) get the pre-activations in T ([A_gate | A_up] gated).
template <int R, int N, typename T, typename A>
void block_gemv_rows(A (&h)[R][N], const A* xr, const A* gate, const T* keys,
                     const T* key_bias, const T* gate_keys, const T* gate_bias, int64_t d,
                     int64_t g, int64_t row, int64_t r, Act act, T* saved) {
  A pre[R][N];
  dot_rows<R, N, T, A>(keys + row * d, xr, d, pre);
  if (gate_keys != nullptr) {
    A pre_g[R][N];
    dot_rows<R, N, T, A>(gate_keys + row * d, xr, d, pre_g);
    for (int j = 0; j < R; ++j) {
      const A bias = key_bias != nullptr ? static_cast<A>(key_bias[row + j]) : A(0);
      const A gbias = gate_bias != nullptr ? static_cast<A>(gate_bias[row + j]) : A(0);
      for (int i = 0; i < N; ++i) {
        const T pg = static_cast<T>(pre_g[j][i] + gbias), pu = static_cast<T>(pre[j][i] + bias);
        if (saved != nullptr) {
          saved[i * 2 * g + r + j] = pg;
          saved[i * 2 * g + g + r + j] = pu;
        }
        const T a = static_cast<T>(activate_scalar<A>(static_cast<A>(pg), act));
        h[j][i] = gate[i] * static_cast<A>(static_cast<T>(static_cast<A>(a) * static_cast<A>(pu)));
      }
    }
    return;
  }
  for (int j = 0; j < R; ++j) {
    const A bias = key_bias != nullptr ? static_cast<A>(key_bias[row + j]) : A(0);
    for (int i = 0; i < N; ++i) {
      const T p = static_cast<T>(pre[j][i] + bias);
      if (saved != nullptr) saved[i * g + r + j] = p;
      h[j][i] = gate[i] * activate_scalar<A>(static_cast<A>(p), act);
    }
  }
}

// Block b for the N (<= kGemvGroup) pairs `pairs`: acc[token] += gate * act(x . k + bias) v,
// or for a gated FFN (gate_keys given) acc[token] += gate * act(x . kg + bg) (x . k + bias) v;
// saved rows (if any) get the pre-activations in the input dtype ([A_gate | A_up] when gated).
// Each key row's h is added with its value row right after: one pass over the block's rows.
template <int N, typename T, typename A>
void block_gemv(A* acc, const T* x, const T* keys, const T* values, const T* key_bias,
                const T* gate_keys, const T* gate_bias, const A* gates, const int64_t* pairs,
                int64_t top_k, int64_t d, int64_t g, int64_t b, Act act, T* saved) {
  std::vector<A> xr(static_cast<size_t>(N * d));  // the N token rows, converted to A
  A* yr[N];
  A gate[N];
  for (int i = 0; i < N; ++i) {
    const int64_t t = pairs[i] / top_k;
    for (int64_t c = 0; c < d; ++c) xr[static_cast<size_t>(i * d + c)] = static_cast<A>(x[t * d + c]);
    yr[i] = acc + t * d;
    gate[i] = gates != nullptr ? gates[pairs[i]] : A(1);
  }
  constexpr int R = kGemvRows<N>;
  // Decoding reads the block's rows from memory once: prefetch them ahead, since the hardware
  // prefetchers stop at each 4 KiB page (a step of R rows is a page or more at d_model >= 512).
  const int64_t ahead = std::max<int64_t>(R, (kPrefetchBytes + d * int64_t{sizeof(T)} - 1) /
                                                 (d * int64_t{sizeof(T)}));
  const T* tables[3] = {keys + b * g * d, values + b * g * d,
                        gate_keys != nullptr ? gate_keys + b * g * d : nullptr};
  prefetch_rows(tables, 0, std::min(ahead, g), d);
  int64_t r = 0;
  for (; r + R <= g; r += R) {
    if (r + ahead < g) prefetch_rows(tables, r + ahead, std::min<int64_t>(R, g - r - ahead), d);
    A h[R][N];
    block_gemv_rows<R, N, T, A>(h, xr.data(), gate, keys, key_bias, gate_keys, gate_bias, d, g,
                                b * g + r, r, act, saved);
    axpy_rows<R, N, T, A>(yr, h, values + (b * g + r) * d, d);
  }
  for (; r < g; ++r) {
    A h[1][N];
    block_gemv_rows<1, N, T, A>(h, xr.data(), gate, keys, key_bias, gate_keys, gate_bias, d, g,
                                b * g + r, r, act, saved);
    axpy_rows<1, N, T, A>(yr, h, values + (b * g + r) * d, d);
  }
}

template <typename T, typename A>
void block_gemv_any(A* acc, const T* x, const T* keys, const T* values, const T* key_bias,
                    const T* gate_keys, const T* gate_bias, const A* gates,
                    const int64_t* pairs, int64_t n, int64_t top_k, int64_t d, int64_t g,
                    int64_t b, Act act, T* saved) {
  const int64_t sw = gate_keys != nullptr ? 2 * g : g;
  for (int64_t i0 = 0; i0 < n; i0 += kGemvGroup) {
    const int64_t m = std::min(kGemvGroup, n - i0);
    T* sv = saved != nullptr ? saved + i0 * sw : nullptr;
    const int64_t* pp = pairs + i0;
#define SFNN_GEMV(N_)                                                                      \
  block_gemv<N_, T, A>(acc, x, keys, values, key_bias, gate_keys, gate_bias, gates, pp, top_k, \
                       d, g, b, act, sv)
    switch (m) {
      case 1: SFNN_GEMV(1); break;
      case 2: SFNN_GEMV(2); break;
      case 3: SFNN_GEMV(3); break;
      default: SFNN_GEMV(4); break;
    }
#undef SFNN_GEMV
  }
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& indices, int64_t block_size) {
  TORCH_CHECK(x.device().is_cpu(), "sfnn_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sfnn_cpu: x must be contiguous (T, d_model)");
  TORCH_CHECK(keys.dim() == 2 && keys.is_contiguous() && values.sizes() == keys.sizes() &&
                  values.is_contiguous() && keys.size(1) == x.size(1),
              "sfnn_cpu: keys and values must be contiguous (d_ff, d_model)");
  TORCH_CHECK(keys.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type(),
              "sfnn_cpu: x, keys and values must share one dtype");
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.dim() == 2 &&
                  indices.size(0) == x.size(0) && indices.is_contiguous(),
              "sfnn_cpu: indices must be contiguous int32 (T, top_k)");
  TORCH_CHECK(block_size >= 1 && keys.size(0) % block_size == 0,
              "sfnn_cpu: block_size must divide d_ff");
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// A gated FFN's gate table: gate_keys like keys, gate_bias (d_ff,) only with gate_keys.
void check_gate(const at::Tensor& keys, const at::Tensor& gate_keys, const at::Tensor& gate_bias) {
  TORCH_CHECK(!gate_bias.defined() || gate_keys.defined(),
              "sfnn_cpu: gate_bias without gate_keys");
  if (!gate_keys.defined()) return;
  TORCH_CHECK(gate_keys.sizes() == keys.sizes() && gate_keys.scalar_type() == keys.scalar_type(),
              "sfnn_cpu: gate_keys must be (d_ff, d_model) in keys' dtype");
  TORCH_CHECK(!gate_bias.defined() || (gate_bias.dim() == 1 && gate_bias.size(0) == keys.size(0)
                                       && gate_bias.scalar_type() == keys.scalar_type()),
              "sfnn_cpu: gate_bias must be (d_ff,) in keys' dtype");
}

// pre = x kb^T (+ bias), into pre (which may be a column slice of a wider row-major tensor).
void key_gemm(at::Tensor& pre, const at::Tensor& xb, const at::Tensor& kb, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(pre, bias, xb, kb.t());
  } else {
    at::mm_out(pre, xb, kb.t());
  }
}

std::tuple<at::Tensor, at::Tensor> block_ffn_fwd(
    const at::Tensor& x, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& indices, const std::optional<at::Tensor>& key_bias_in,
    const std::optional<at::Tensor>& out_bias_in, const std::optional<at::Tensor>& gates_in,
    int64_t block_size, const std::string& activation, bool save,
    const std::optional<at::Tensor>& gate_keys_in, const std::optional<at::Tensor>& gate_bias_in) {
  check_inputs(x, keys, values, indices, block_size);
  const Act act = parse_activation(activation);
  const int64_t T = x.size(0), d = x.size(1), top_k = indices.size(1), g = block_size;
  const int64_t n_blocks = keys.size(0) / g;
  const at::Tensor key_bias = contiguous_or_undefined(key_bias_in);
  const at::Tensor out_bias = contiguous_or_undefined(out_bias_in);
  const at::Tensor gate_keys = contiguous_or_undefined(gate_keys_in);
  const at::Tensor gate_bias = contiguous_or_undefined(gate_bias_in);
  check_gate(keys, gate_keys, gate_bias);
  const bool gated = gate_keys.defined();
  const int64_t sw = gated ? 2 * g : g;  // saved row width: [A_gate | A_up] when gated
  const at::ScalarType acc_t = acc_type(x.scalar_type());
  const at::Tensor gates =
      gates_in.has_value() && gates_in->defined() ? gates_in->to(acc_t).contiguous()
                                                  : at::Tensor();
  const Routing r = route(indices, n_blocks);
  at::Tensor y = at::empty({T, d}, x.options());
  at::Tensor saved = save ? at::empty({T * top_k, sw}, x.options()) : at::empty({0}, x.options());
  if (T == 0) return {y, saved};
  const int64_t acc_bytes = T * d * static_cast<int64_t>(c10::elementSize(acc_t));
  const int64_t tasks = num_tasks(n_blocks, acc_bytes);
  const std::vector<int64_t> bounds = partition(r, n_blocks, tasks);
  std::vector<at::Tensor> acc = task_accumulators(y, tasks, acc_t);
  const int64_t chunk = chunk_rows(d, x.element_size());

  run_tasks(tasks, [&](int64_t task) {
    at::Tensor& out = acc[static_cast<size_t>(task)];
    out.zero_();
    at::Tensor s_x, s_pre, s_h, s_out;  // [chunk, d], [chunk, g], [chunk, g], [chunk, d]
    for (int64_t b = bounds[task]; b < bounds[task + 1]; ++b) {
      const int64_t p0 = r.offset[b], n = r.offset[b + 1] - p0;
      if (n == 0) continue;
      const int64_t* pairs = r.pair.data() + p0;
      if (n <= kGemvMaxRows) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_mv",
                                        [&] {
          using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          block_gemv_any<scalar_t, A>(
              out.data_ptr<A>(), x.data_ptr<scalar_t>(), keys.data_ptr<scalar_t>(),
              values.data_ptr<scalar_t>(),
              key_bias.defined() ? key_bias.data_ptr<scalar_t>() : nullptr,
              gated ? gate_keys.data_ptr<scalar_t>() : nullptr,
              gate_bias.defined() ? gate_bias.data_ptr<scalar_t>() : nullptr,
              gates.defined() ? gates.data_ptr<A>() : nullptr, pairs, n, top_k, d, g, b, act,
              save ? saved.data_ptr<scalar_t>() + p0 * sw : nullptr);
        });
        continue;
      }
      if (!s_x.defined()) {
        s_x = at::empty({chunk, d}, x.options());
        s_pre = at::empty({chunk, sw}, x.options());
        s_h = at::empty({chunk, g}, x.options());
        s_out = at::empty({chunk, d}, x.options());
      }
      const at::Tensor kb = keys.narrow(0, b * g, g), vb = values.narrow(0, b * g, g);
      const at::Tensor bb = key_bias.defined() ? key_bias.narrow(0, b * g, g) : at::Tensor();
      const at::Tensor gkb = gated ? gate_keys.narrow(0, b * g, g) : at::Tensor();
      const at::Tensor gbb = gate_bias.defined() ? gate_bias.narrow(0, b * g, g) : at::Tensor();
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        at::Tensor xb = s_x.narrow(0, 0, m);
        gather_rows(xb, x, pairs + c0, m, top_k);
        at::Tensor pre = save ? saved.narrow(0, p0 + c0, m) : s_pre.narrow(0, 0, m);
        at::Tensor h = s_h.narrow(0, 0, m);
        if (gated) {  // h = act(x kg^T + bg) * (x k^T + b)
          at::Tensor pre_g = pre.narrow(1, 0, g), pre_u = pre.narrow(1, g, g);
          key_gemm(pre_g, xb, gkb, gbb);
          key_gemm(pre_u, xb, kb, bb);
          activate(h, pre_g, act);
          h.mul_(pre_u);
        } else {
          key_gemm(pre, xb, kb, bb);
          activate(h, pre, act);
        }
        at::Tensor ob = s_out.narrow(0, 0, m);
        at::mm_out(ob, h, vb);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_fwd",
                                        [&] {
          using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          scatter_add_rows<scalar_t, A>(out.data_ptr<A>(), ob.data_ptr<scalar_t>(),
                                        pairs + c0, m, top_k, d,
                                        gates.defined() ? gates.data_ptr<A>() : nullptr);
        });
      }
    }
  });

  sum_accumulators(y, acc, out_bias);
  return {y, saved};
}

// Per-pair, per-row helpers of the backward (input dtype T, accumulation dtype A).
template <typename T, typename A>
void scale_rows(T* m, const A* gates, const int64_t* pairs, int64_t n, int64_t cols) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = static_cast<T>(gates[pairs[i]]);
    for (int64_t c = 0; c < cols; ++c) m[i * cols + c] = static_cast<T>(m[i * cols + c] * g);
  }
}

template <typename T, typename A>
void row_dots(A* out, const T* h, const T* dh, const int64_t* pairs, int64_t n, int64_t cols) {
  for (int64_t i = 0; i < n; ++i) {
    A s = 0;
    for (int64_t c = 0; c < cols; ++c) {
      s += static_cast<A>(static_cast<T>(h[i * cols + c] * dh[i * cols + c]));
    }
    out[pairs[i]] = s;
  }
}

// sums[c] += sum_i m[i, c] (in double: a block's bias gradient sums all its pairs' rows).
template <typename T>
void add_column_sums(double* sums, const T* m, int64_t n, int64_t cols) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < cols; ++c) sums[c] += static_cast<double>(m[i * cols + c]);
}

// The backward. For a gated FFN (gate_keys given) h = act(A_g) * A_u with A_g = x kg^T + bg,
// A_u = x k^T + b: dA_u = dh * act(A_g), dA_g = dh * A_u * act'(A_g), dx = dA_g kg + dA_u k.
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads block_ffn_bwd(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& indices,
    const std::optional<at::Tensor>& key_bias_in, const std::optional<at::Tensor>& gates_in,
    const at::Tensor& saved, int64_t block_size, const std::string& activation,
    c10::List<bool> needs, const std::optional<at::Tensor>& gate_keys_in,
    const std::optional<at::Tensor>& gate_bias_in) {
  check_inputs(x, keys, values, indices, block_size);
  TORCH_CHECK(needs.size() == 5 || needs.size() == 7, "sfnn_cpu: needs must hold 5 or 7 flags");
  const Act act = parse_activation(activation);
  const at::Tensor dy = dy_in.contiguous();
  const int64_t T = x.size(0), d = x.size(1), top_k = indices.size(1), g = block_size;
  const int64_t n_blocks = keys.size(0) / g;
  const at::Tensor key_bias = contiguous_or_undefined(key_bias_in);
  const at::Tensor gate_keys = contiguous_or_undefined(gate_keys_in);
  const at::Tensor gate_bias = contiguous_or_undefined(gate_bias_in);
  check_gate(keys, gate_keys, gate_bias);
  const bool gated = gate_keys.defined();
  const int64_t sw = gated ? 2 * g : g;
  const at::ScalarType acc_t = acc_type(x.scalar_type());
  const at::Tensor gates =
      gates_in.has_value() && gates_in->defined() ? gates_in->to(acc_t).contiguous()
                                                  : at::Tensor();
  const bool need_dx = needs[0], need_dk = needs[1], need_dv = needs[2];
  const bool need_dkb = needs[3] && key_bias.defined(), need_dg = needs[4] && gates.defined();
  const bool need_dgk = gated && needs.size() == 7 && needs[5];
  const bool need_dgb = gate_bias.defined() && needs.size() == 7 && needs[6];
  const bool need_da = need_dx || need_dk || need_dkb || need_dgk || need_dgb;
  const bool have_saved = saved.numel() > 0;
  TORCH_CHECK(!have_saved || (saved.size(0) == T * top_k && saved.size(1) == sw &&
                              saved.is_contiguous()),
              "sfnn_cpu: saved must be (T * top_k, block_size), (T * top_k, 2 * block_size) "
              "when gated");
  const auto opts = x.options();
  const at::Tensor none = at::empty({0}, opts);
  at::Tensor dkeys = need_dk ? at::empty_like(keys) : none;
  at::Tensor dvalues = need_dv ? at::empty_like(values) : none;
  at::Tensor dkey_bias = need_dkb ? at::empty_like(key_bias) : none;
  at::Tensor dgates = need_dg ? at::empty({T, top_k}, opts.dtype(acc_t)) : none;
  at::Tensor dgate_keys = need_dgk ? at::empty_like(gate_keys) : none;
  at::Tensor dgate_bias = need_dgb ? at::empty_like(gate_bias) : none;
  at::Tensor dx = need_dx ? at::empty({T, d}, opts) : none;
  if (T == 0) return {dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys, dgate_bias};
  const Routing r = route(indices, n_blocks);
  const int64_t acc_bytes = T * d * static_cast<int64_t>(c10::elementSize(acc_t));
  const int64_t tasks = num_tasks(n_blocks, need_dx ? acc_bytes : 0);
  const std::vector<int64_t> bounds = partition(r, n_blocks, tasks);
  std::vector<at::Tensor> acc = need_dx ? task_accumulators(dx, tasks, acc_t)
                                        : std::vector<at::Tensor>();
  const int64_t chunk = chunk_rows(d, x.element_size());

  run_tasks(tasks, [&](int64_t task) {
    if (need_dx) acc[static_cast<size_t>(task)].zero_();
    // [chunk, d] x 2, [chunk, sw], [chunk, g] x 3 (+ 2 gated)
    at::Tensor s_dy = at::empty({chunk, d}, opts), s_x = at::empty({chunk, d}, opts);
    at::Tensor s_pre = at::empty({chunk, sw}, opts), s_h = at::empty({chunk, g}, opts);
    at::Tensor s_dh = at::empty({chunk, g}, opts), s_da = at::empty({chunk, g}, opts);
    at::Tensor s_act = gated ? at::empty({chunk, g}, opts) : none;
    at::Tensor s_dau = gated ? at::empty({chunk, g}, opts) : none;
    for (int64_t b = bounds[task]; b < bounds[task + 1]; ++b) {
      const int64_t p0 = r.offset[b], n = r.offset[b + 1] - p0;
      if (n == 0) {  // nobody chose it: zero gradients (each block is one task's)
        if (need_dk) dkeys.narrow(0, b * g, g).zero_();
        if (need_dv) dvalues.narrow(0, b * g, g).zero_();
        if (need_dkb) dkey_bias.narrow(0, b * g, g).zero_();
        if (need_dgk) dgate_keys.narrow(0, b * g, g).zero_();
        if (need_dgb) dgate_bias.narrow(0, b * g, g).zero_();
        continue;
      }
      const at::Tensor kb = keys.narrow(0, b * g, g), vb = values.narrow(0, b * g, g);
      const at::Tensor bb = key_bias.defined() ? key_bias.narrow(0, b * g, g) : at::Tensor();
      const at::Tensor gkb = gated ? gate_keys.narrow(0, b * g, g) : at::Tensor();
      const at::Tensor gbb = gate_bias.defined() ? gate_bias.narrow(0, b * g, g) : at::Tensor();
      at::Tensor dkb = need_dk ? dkeys.narrow(0, b * g, g) : none;
      at::Tensor dvb = need_dv ? dvalues.narrow(0, b * g, g) : none;
      at::Tensor dgkb = need_dgk ? dgate_keys.narrow(0, b * g, g) : none;
      std::vector<double> bias_sum(need_dkb ? static_cast<size_t>(g) : 0, 0.0);
      std::vector<double> gbias_sum(need_dgb ? static_cast<size_t>(g) : 0, 0.0);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t m = std::min(chunk, n - c0);
        const int64_t* pairs = r.pair.data() + p0 + c0;
        const bool first = c0 == 0;
        at::Tensor dyb = s_dy.narrow(0, 0, m);
        gather_rows(dyb, dy, pairs, m, top_k);
        at::Tensor xb = s_x.narrow(0, 0, m);
        if (need_dk || need_dgk || !have_saved) gather_rows(xb, x, pairs, m, top_k);
        at::Tensor pre = have_saved ? saved.narrow(0, p0 + c0, m) : s_pre.narrow(0, 0, m);
        // pre_a: the activation's input (the gate's pre-activation when gated)
        at::Tensor pre_a = gated ? pre.narrow(1, 0, g) : pre;
        at::Tensor pre_u = gated ? pre.narrow(1, g, g) : none;
        if (!have_saved) {
          if (gated) {
            key_gemm(pre_a, xb, gkb, gbb);
            key_gemm(pre_u, xb, kb, bb);
          } else {
            key_gemm(pre, xb, kb, bb);
          }
        }
        at::Tensor h = s_h.narrow(0, 0, m), dh = s_dh.narrow(0, 0, m);
        at::Tensor act_g = gated ? s_act.narrow(0, 0, m) : none;
        if (gated && (need_dv || need_dg || need_da)) activate(act_g, pre_a, act);
        if (need_dv || need_dg) {
          if (gated) {
            at::mul_out(h, act_g, pre_u);
          } else {
            activate(h, pre, act);
          }
        }
        if (need_da || need_dg) at::mm_out(dh, dyb, vb.t());  // before the gate
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_g",
                                        [&] {
          using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          if (!gates.defined()) return;
          const A* gp = gates.data_ptr<A>();
          if (need_dg) {
            row_dots<scalar_t, A>(dgates.data_ptr<A>(), h.data_ptr<scalar_t>(),
                                  dh.data_ptr<scalar_t>(), pairs, m, g);
          }
          if (need_dv) scale_rows<scalar_t, A>(h.data_ptr<scalar_t>(), gp, pairs, m, g);
          if (need_da) scale_rows<scalar_t, A>(dh.data_ptr<scalar_t>(), gp, pairs, m, g);
        });
        if (need_dv) {
          if (first) {
            at::mm_out(dvb, h.t(), dyb);
          } else {
            dvb.addmm_(h.t(), dyb);
          }
        }
        if (!need_da) continue;
        // da: the gradient of the activation's input (dA_g when gated); dau: of A_u (gated)
        at::Tensor da = s_da.narrow(0, 0, m);
        at::Tensor dau = gated ? s_dau.narrow(0, 0, m) : none;
        if (gated) {
          at::mul_out(dau, dh, act_g);
          at::mul_out(h, dh, pre_u);  // h is used up: it holds dh * A_u now
          activate_backward(da, h, pre_a, act);
        } else {
          activate_backward(da, dh, pre, act);
        }
        const at::Tensor& du = gated ? dau : da;  // the up table's pre-activation gradient
        if (need_dk) {
          if (first) {
            at::mm_out(dkb, du.t(), xb);
          } else {
            dkb.addmm_(du.t(), xb);
          }
        }
        if (need_dgk) {
          if (first) {
            at::mm_out(dgkb, da.t(), xb);
          } else {
            dgkb.addmm_(da.t(), xb);
          }
        }
        if (need_dkb || need_dgb) {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_db",
                                          [&] {
            if (need_dkb) add_column_sums<scalar_t>(bias_sum.data(), du.data_ptr<scalar_t>(), m, g);
            if (need_dgb) add_column_sums<scalar_t>(gbias_sum.data(), da.data_ptr<scalar_t>(), m, g);
          });
        }
        if (need_dx) {
          at::Tensor dxb = s_dy.narrow(0, 0, m);  // this chunk's dy rows are used up
          at::mm_out(dxb, du, kb);
          if (gated) dxb.addmm_(da, gkb);
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_dx",
                                          [&] {
            using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
            scatter_add_rows<scalar_t, A>(acc[static_cast<size_t>(task)].data_ptr<A>(),
                                          dxb.data_ptr<scalar_t>(), pairs, m, top_k, d,
                                          nullptr);
          });
        }
      }
      if (need_dkb || need_dgb) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sfnn_db",
                                        [&] {
          if (need_dkb) {
            scalar_t* out = dkey_bias.data_ptr<scalar_t>() + b * g;
            for (int64_t c = 0; c < g; ++c) out[c] = static_cast<scalar_t>(bias_sum[c]);
          }
          if (need_dgb) {
            scalar_t* out = dgate_bias.data_ptr<scalar_t>() + b * g;
            for (int64_t c = 0; c < g; ++c) out[c] = static_cast<scalar_t>(gbias_sum[c]);
          }
        });
      }
    }
  });

  if (need_dx) sum_accumulators(dx, acc, at::Tensor());
  return {dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys, dgate_bias};
}

// ---- selection: scores and top-K in one region

// The torch path's packed key (torch_path.ordered_score_keys): the float32 score's bits made
// order-preserving as a signed integer above n_blocks - 1 - b, so one descending order is
// "larger score, then smaller index" and every key is distinct.
inline int64_t score_key(float s, int64_t b, int64_t n_blocks) {
  int32_t bits;
  const float v = s + 0.0f;  // -0 -> +0
  std::memcpy(&bits, &v, sizeof(bits));
  bits ^= (bits >> 31) & 0x7FFFFFFF;
  return (static_cast<int64_t>(bits) << 32) | (n_blocks - 1 - b);
}

// out[0 .. top_k) = one token's top_k blocks, best first, from its scores s[b * step] (keys:
// scratch of n_blocks entries).
void top_blocks(const float* s, int64_t step, int64_t n_blocks, int64_t top_k,
                std::vector<int64_t>& keys, int32_t* out) {
  for (int64_t b = 0; b < n_blocks; ++b) keys[b] = score_key(s[b * step], b, n_blocks);
  std::partial_sort(keys.begin(), keys.begin() + top_k, keys.end(), std::greater<>());
  for (int64_t j = 0; j < top_k; ++j) {
    out[j] = static_cast<int32_t>(n_blocks - 1 - (keys[j] & 0xFFFFFFFF));
  }
}

at::Tensor select_blocks(const at::Tensor& x_in, const at::Tensor& kbar_in,
                         const std::optional<at::Tensor>& bbar_in, int64_t top_k) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "sfnn_cpu: x must be a CPU (T, d)");
  TORCH_CHECK(x_in.scalar_type() != at::kDouble, "sfnn_cpu: float64 selects on the torch path");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor kbar = kbar_in.to(at::kFloat).contiguous();
  const at::Tensor bbar =
      bbar_in.has_value() && bbar_in->defined() ? bbar_in->to(at::kFloat).contiguous()
                                                : at::Tensor();
  const int64_t T = x.size(0), n_blocks = kbar.size(0);
  TORCH_CHECK(kbar.dim() == 2 && kbar.size(1) == x.size(1), "sfnn_cpu: kbar must be (n, d)");
  TORCH_CHECK(top_k >= 1 && top_k <= n_blocks, "sfnn_cpu: top_k must be in [1, n_blocks]");
  at::Tensor out = at::empty({T, top_k}, x.options().dtype(at::kInt));
  if (T == 0) return out;
  if (T <= kFewTokenRows) {
    // Decoding: split the scores over blocks instead of tokens, so that every thread reads its
    // share of kbar (4 MiB at d_model 4096: the largest read of a decoded token's selection);
    // at least 512 KiB of it per thread (below that one thread beats a region's start).
    at::Tensor scores = at::empty({n_blocks, T}, kbar.options());  // block-major
    const at::Tensor xt = x.to(at::kFloat).t();
    const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 19) / (x.size(1) * 4));
    at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
      const WorkerScope scope;
      at::Tensor part = scores.narrow(0, b0, b1 - b0);
      const at::Tensor kpart = kbar.narrow(0, b0, b1 - b0);
      if (bbar.defined()) {
        at::addmm_out(part, bbar.narrow(0, b0, b1 - b0).unsqueeze(1), kpart, xt);
      } else {
        at::mm_out(part, kpart, xt);
      }
    });
    const float* sp = scores.data_ptr<float>();
    int32_t* o = out.data_ptr<int32_t>();
    std::vector<int64_t> keys(static_cast<size_t>(n_blocks));
    for (int64_t t = 0; t < T; ++t) top_blocks(sp + t, T, n_blocks, top_k, keys, o + t * top_k);
    return out;
  }
  // Token rows per GEMM: their scores, (rows, n_blocks) fp32, stay within ~256 KiB.
  const int64_t chunk = std::clamp<int64_t>(int64_t{65536} / n_blocks, 16, 512);
  at::parallel_for(0, T, chunk, [&](int64_t t_begin, int64_t t_end) {
    const WorkerScope scope;
    std::vector<int64_t> keys(static_cast<size_t>(n_blocks));
    int32_t* o = out.data_ptr<int32_t>();
    for (int64_t t0 = t_begin; t0 < t_end; t0 += chunk) {
      const int64_t m = std::min(chunk, t_end - t0);
      const at::Tensor xs = x.narrow(0, t0, m).to(at::kFloat);
      const at::Tensor sc = bbar.defined() ? at::addmm(bbar, xs, kbar.t()) : at::mm(xs, kbar.t());
      const float* sp = sc.data_ptr<float>();
      for (int64_t i = 0; i < m; ++i) {
        top_blocks(sp + i * n_blocks, 1, n_blocks, top_k, keys, o + (t0 + i) * top_k);
      }
    }
  });
  return out;
}

// Inference: the blocks select_blocks picks, then block_ffn_fwd over them, in one call. A
// decoded token's kernels take about as long as the Python around them; one call instead of
// two saves a dispatcher round trip and the op layer's frames for the second.
std::tuple<at::Tensor, at::Tensor> avgk_ffn_fwd(
    const at::Tensor& x, const at::Tensor& kbar, const std::optional<at::Tensor>& bbar,
    const at::Tensor& keys, const at::Tensor& values, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& out_bias, int64_t top_k, int64_t block_size,
    const std::string& activation, const std::optional<at::Tensor>& gate_keys,
    const std::optional<at::Tensor>& gate_bias) {
  at::Tensor indices = select_blocks(x, kbar, bbar, top_k);
  at::Tensor y = std::get<0>(block_ffn_fwd(x, keys, values, indices, key_bias, out_bias,
                                           std::nullopt, block_size, activation, false,
                                           gate_keys, gate_bias));
  return {y, indices};
}

// The number of threads that ran a parallel region of this library, as the kernels open them:
// torch's thread count where the library was built with OpenMP, 1 where it was not (ATen's
// parallel_for is inline in its headers and runs serially without OpenMP).
int64_t region_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int id = std::min(at::get_thread_num(), 63);
    seen.fetch_or(uint64_t{1} << id, std::memory_order_relaxed);
  });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY(sfnn_cpu, m) {
  m.def(
      "block_ffn_fwd(Tensor x, Tensor keys, Tensor values, Tensor indices, Tensor? key_bias, "
      "Tensor? out_bias, Tensor? gates, int block_size, str activation, bool save, "
      "Tensor? gate_keys=None, Tensor? gate_bias=None) -> (Tensor, Tensor)",
      &block_ffn_fwd);
  m.def(
      "block_ffn_bwd(Tensor dy, Tensor x, Tensor keys, Tensor values, Tensor indices, "
      "Tensor? key_bias, Tensor? gates, Tensor saved, int block_size, str activation, "
      "bool[] needs, Tensor? gate_keys=None, Tensor? gate_bias=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      &block_ffn_bwd);
  m.def("select_blocks(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor",
        &select_blocks);
  m.def(
      "avgk_ffn_fwd(Tensor x, Tensor kbar, Tensor? bbar, Tensor keys, Tensor values, "
      "Tensor? key_bias, Tensor? out_bias, int top_k, int block_size, str activation, "
      "Tensor? gate_keys=None, Tensor? gate_bias=None) -> (Tensor, Tensor)",
      &avgk_ffn_fwd);
  m.def("region_threads() -> int", &region_threads);
}
