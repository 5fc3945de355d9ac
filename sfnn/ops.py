"""The op layer: backend dispatch, torch.library registration and autograd, in one place.

Every backend provides the same functions (the backend protocol):

- ``block_means(keys, key_bias, block_size) -> (kbar (n_blocks, d_model), bbar (n_blocks,) | None)``
  in float32 (float64 for float64 keys: only the torch path receives float64)
- ``select_blocks(x2d, kbar, bbar, top_k) -> int32 (T, top_k)``
- ``block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size, activation,
  save_for_backward, deterministic, gate_keys=None, gate_bias=None) -> (y, saved, route)``:
  ``saved`` holds what the backward needs of the activations (empty when not saving), ``route``
  is the backend's routing of the (token, slot) pairs kept for the backward (int32, empty when
  the backend keeps none; its length is ``route_numel(T, top_k, n_blocks, deterministic)``)
- ``block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route, *, block_size,
  activation, deterministic, needs, gate_keys=None, gate_bias=None) -> (dx, dkeys, dvalues,
  dkey_bias, dgates, dgate_keys, dgate_bias)``: ``needs`` is one bool per output
  (:data:`GRAD_NAMES` order); an output not needed (or of an absent input) is None, and the
  work only it needs is skipped
- ``route_numel(T, top_k, n_blocks, deterministic) -> int``
- optionally ``avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias, *, top_k,
  block_size, activation, gate_keys=None, gate_bias=None) -> (y, indices)``: ``select_blocks``
  then ``block_ffn_fwd`` (no gates, nothing saved) in one step, for inference (:func:`avgk_ffn`;
  the torch path's CPU kernel and the CUDA extension have one)

Gated FFNs (SwiGLU, GeGLU): with ``gate_keys`` (d_ff, d_model) (and optionally ``gate_bias``
(d_ff,)) the cell is ``h_i = act(x.kg_i + bg_i) * (x.ku_i + bu_i)``, ``keys``/``key_bias``
being the *up* table (linear) and ``gate_keys``/``gate_bias`` the gate table (act applies to
it); Avg-K then scores ``block_means(gate_keys, gate_bias)``. The torch path's ``saved`` for a
gated call is (T * top_k, 2 * g), ``[A_gate | A_up]`` per (token, slot) row in block order.
Only the backends in :data:`GATED_BACKENDS` take gated calls (:func:`has_gated`); the others are
called with the plain protocol (no ``gate_*`` arguments, five ``needs`` flags, five gradients
back: the op layer pads the last two), and an explicit gated call to one raises
NotImplementedError.

They receive contiguous tensors with T >= 1. The ops registered here (namespace ``sfnn``) wrap
them so that ``torch.compile`` traces the layer without graph breaks: ``sfnn::block_means``,
``sfnn::select_blocks``, ``sfnn::block_ffn`` (with autograd) and ``sfnn::block_ffn_backward``.
Optional tensors that an op returns are empty tensors when absent (ops cannot return None).
The functional API calls them through :func:`block_means`, :func:`select_blocks`,
:func:`block_ffn` and :func:`avgk_ffn`, which run an op's Python body (or a backend's fused
inference step) directly when nothing needs the dispatcher (eager inference on plain tensors:
:func:`_direct`), the same computation without its per-call cost.

Where the registered ops cannot serve, this layer also routes (:func:`transform_route`): under
forward-mode AD and ``torch.func`` transforms, and for double backward, the layer is computed
from the torch path's differentiable torch ops (:func:`block_ffn_composite`), and where
``vmap`` meets another transform, from the dense-masked reference. Called directly, the
registered ops see no forward-mode tangents (PyTorch gives custom ops zero tangents without
telling): use the functional API (:mod:`sfnn.functional`), which routes around them.
"""
from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch
import torch.autograd.forward_ad as fwAD

from . import torch_path

Tensor = torch.Tensor

BACKENDS = ("auto", "torch", "triton", "cuda", "reference")
# The gradients block_ffn_bwd returns, in order (out_bias's is dy.sum(0), taken by the op layer).
GRAD_NAMES = ("x", "keys", "values", "key_bias", "gates", "gate_keys", "gate_bias")
# The plain FFN's gradients: what a backend without a gated path computes and returns.
PLAIN_GRAD_NAMES = GRAD_NAMES[:5]
# The backends with a gated path (gate_keys=/gate_bias= in block_ffn_fwd/bwd, seven gradients).
# The CUDA extension's decode kernels have the gated gather-GEMV (forward only); Triton's gated
# kernels are triton_kernels/gated_ffn.py. A backend left out of this set gets no gated call:
# backend="auto" routes gated calls to the next backend that has one (torch in the end).
GATED_BACKENDS = frozenset({"torch", "cuda", "triton"})
# The CUDA extension serves decoding: at most this many tokens under backend="auto".
CUDA_DECODE_MAX_TOKENS = 15


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton and sfnn's Triton kernels import, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'sfnn[triton]')"
    try:
        _triton_backend()
    except Exception as err:  # noqa: BLE001 - report any import failure to the caller
        return f"sfnn's Triton kernels failed to import: {type(err).__name__}: {err}"
    return None


@functools.cache
def _triton_backend() -> SimpleNamespace:
    from .triton_kernels import avgk_topk, block_ffn, block_means

    def select_blocks(x2d, kbar, bbar, top_k):
        if top_k > avgk_topk.MAX_TOP_K:
            # Past the kernel's on-chip running top-K: score densely and take torch's top-k
            # (same packed keys, same ties, still no host sync).
            return torch_path.select_blocks(x2d, kbar, bbar, top_k)
        return avgk_topk.avgk_topk(x2d, kbar, bbar, top_k)

    return SimpleNamespace(
        block_means=block_means.block_means,
        select_blocks=select_blocks,
        block_ffn_fwd=block_ffn.block_ffn_fwd,
        block_ffn_bwd=block_ffn.block_ffn_bwd,
        route_numel=block_ffn.route_numel,
    )


def _cuda_ext():
    from . import cuda_ext

    return cuda_ext


def _triton_interpreting() -> bool:
    """Whether sfnn's Triton kernels run in Triton's interpreter (the one flag,
    ``triton_kernels._common.INTERPRET``; False where triton is not installed)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from .triton_kernels._common import INTERPRET

    return INTERPRET


@functools.cache
def _cuda_backend() -> SimpleNamespace:
    """The CUDA extension's decode kernels, forward only; block means come from the torch path."""
    ext = _cuda_ext()

    def avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias, *, top_k, block_size,
                     activation, gate_keys=None, gate_bias=None):
        if gate_keys is None:  # one launch: selection and FFN fused
            return ext.decode_step(x2d, kbar, bbar, keys, values, key_bias, out_bias,
                                   top_k=top_k, block_size=block_size, activation=activation)
        indices = ext.decode_select(x2d, kbar, bbar, top_k)  # decode_step has no gated variant
        return ext.decode_ffn(x2d, keys, values, indices, key_bias, out_bias, None,
                              block_size=block_size, activation=activation,
                              gate_keys=gate_keys, gate_bias=gate_bias), indices

    def block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size,
                      activation, save_for_backward, deterministic, gate_keys=None,
                      gate_bias=None):
        y = ext.decode_ffn(x2d, keys, values, indices, key_bias, out_bias, gates,
                           block_size=block_size, activation=activation, gate_keys=gate_keys,
                           gate_bias=gate_bias)
        return y, x2d.new_empty(0), indices.new_empty(0)

    def block_ffn_bwd(*args, **kwargs):
        raise RuntimeError("backend='cuda' is forward-only (decoding); use 'triton' or 'torch' "
                           "for training")

    return SimpleNamespace(block_means=torch_path.block_means, select_blocks=ext.decode_select,
                           block_ffn_fwd=block_ffn_fwd, block_ffn_bwd=block_ffn_bwd,
                           avgk_ffn_fwd=avgk_ffn_fwd, route_numel=lambda *args: 0)


def backend_unavailable_reason(backend: str, device: torch.device,
                               dtype: torch.dtype | None = None) -> str | None:
    """None when ``backend`` can run on tensors of ``device`` (and ``dtype``, when given), else a
    sentence saying why not. Only the torch and reference paths compute in float64: the Triton
    kernels and the CUDA extension accumulate in float32."""
    if backend == "torch" or backend == "reference":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64:
        return (f"backend={backend!r} does not compute in float64 (its kernels accumulate in "
                "float32); use backend='torch' (or 'auto', which routes float64 there)")
    if backend == "triton":
        if device.type != "cuda" and not _triton_interpreting():
            return (f"backend='triton' needs CUDA tensors (got {device.type} tensors); on the CPU "
                    "set TRITON_INTERPRET=1 before importing sfnn to run the kernels in Triton's "
                    "interpreter, or use backend='torch'")
        return triton_import_error()
    if device.type != "cuda":
        return f"backend='cuda' needs CUDA tensors (got {device.type} tensors)"
    ext = _cuda_ext()
    return ext.device_unsupported_reason(device) if ext.available() else ext.unavailable_reason()


def has_gated(backend: str) -> bool:
    """True when ``backend`` computes gated FFNs (gate_keys=): the one capability check that
    :func:`resolve_backend` and the registered ops consult (see :data:`GATED_BACKENDS`)."""
    return backend == "reference" or backend in GATED_BACKENDS


def gated_unsupported_message(backend: str) -> str:
    return (f"backend={backend!r} has no gated FFN (SwiGLU/GeGLU, gate_keys=) path yet; use "
            "backend='torch', or 'auto', which routes gated calls to a backend that has one")


def resolve_backend(backend: str, device: torch.device, n_tokens: int, needs_grad: bool,
                    dtype: torch.dtype | None = None, *, gated: bool = False) -> str:
    """The concrete backend for a call. ``auto``: on CUDA tensors the CUDA extension for a few
    tokens without gradients when it is built, else Triton when it imports; otherwise torch.
    float64 always goes to torch (the kernels accumulate in float32). A gated call (``gated``)
    goes only to a backend with a gated path (:func:`has_gated`): under ``auto`` the first of
    those choices that has one, else torch. An explicit backend that cannot run raises
    RuntimeError saying why; one without a gated path, given a gated call, raises
    NotImplementedError."""
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            if (n_tokens <= CUDA_DECODE_MAX_TOKENS and not needs_grad
                    and (not gated or has_gated("cuda"))
                    and backend_unavailable_reason("cuda", device, dtype) is None):
                return "cuda"
            if ((not gated or has_gated("triton"))
                    and backend_unavailable_reason("triton", device, dtype) is None):
                return "triton"
        return "torch"
    if gated and backend in BACKENDS and not has_gated(backend):
        raise NotImplementedError(gated_unsupported_message(backend))
    reason = backend_unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise RuntimeError(reason)
    if backend == "cuda" and needs_grad:
        raise RuntimeError("backend='cuda' is forward-only (decoding) and a gradient is required; "
                           "use backend='triton' or 'torch', or call under torch.no_grad()")
    return backend


def _impl(backend: str) -> SimpleNamespace:
    if backend == "torch":
        return torch_path  # type: ignore[return-value]
    if backend == "triton":
        return _triton_backend()
    if backend == "cuda":
        return _cuda_backend()
    raise ValueError(f"no kernel implementation for backend {backend!r}")


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def means_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of block means and scores for inputs of ``dtype``: float64 stays float64,
    everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _direct(*args) -> bool:
    """Whether a registered op may run as its plain Python body for these arguments: in eager
    mode, outside torch.func transforms and torch function / dispatch modes, on plain tensors
    that autograd does not record (grad mode off, or none requires grad). Then the op's result
    is its body's, and the dispatcher's round trip (autograd, alias checks, a dynamo-disable
    frame: about 25 us per op on the 2-core CPU we measure) is skipped, which was a fifth of a
    decoded token at d_model 512."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
            or torch._C._len_torch_dispatch_stack()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True


# Tensor types a registered op may skip the dispatcher for (nn.Parameter overrides nothing).
_PLAIN = (Tensor, torch.nn.Parameter)


def _block_means(keys: Tensor, key_bias: Tensor | None, block_size: int,
                 backend: str) -> tuple[Tensor, Tensor]:
    """kbar (n_blocks, d_model) and bbar (n_blocks,) in :func:`means_dtype` of keys (bbar empty
    without key_bias)."""
    kbar, bbar = _impl(backend).block_means(keys.contiguous(), _contig(key_bias), block_size)
    return kbar, (kbar.new_empty(0) if bbar is None else bbar)


block_means_op = torch.library.custom_op("sfnn::block_means", _block_means, mutates_args=())


def block_means(keys, key_bias, block_size, backend):
    """:data:`block_means_op`, or its body where nothing needs the dispatcher (:func:`_direct`)."""
    op = _block_means if _direct(keys, key_bias) else block_means_op
    return op(keys, key_bias, block_size, backend)


@block_means_op.register_fake
def _(keys, key_bias, block_size, backend):
    n_blocks = keys.shape[0] // block_size
    dtype = means_dtype(keys.dtype)
    kbar = keys.new_empty(n_blocks, keys.shape[1], dtype=dtype)
    bbar = keys.new_empty(n_blocks if key_bias is not None else 0, dtype=dtype)
    return kbar, bbar


def _select_blocks(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int,
                   backend: str) -> Tensor:
    """int32 (T, top_k): each token's top_k blocks by Avg-K score, best first."""
    if x2d.shape[0] == 0:
        return x2d.new_empty(0, top_k, dtype=torch.int32)
    return _impl(backend).select_blocks(x2d.contiguous(), kbar.contiguous(), _contig(bbar), top_k)


select_blocks_op = torch.library.custom_op("sfnn::select_blocks", _select_blocks,
                                           mutates_args=())


def select_blocks(x2d, kbar, bbar, top_k, backend):
    """:data:`select_blocks_op`, or its body where nothing needs the dispatcher
    (:func:`_direct`)."""
    op = _select_blocks if _direct(x2d, kbar, bbar) else select_blocks_op
    return op(x2d, kbar, bbar, top_k, backend)


@select_blocks_op.register_fake
def _(x2d, kbar, bbar, top_k, backend):
    return x2d.new_empty(x2d.shape[0], top_k, dtype=torch.int32)


def _saved_shape(x2d: Tensor, indices: Tensor, block_size: int, save: bool, backend: str,
                 gated: bool = False):
    """Shape of the tensor the forward keeps for the backward: the selected pre-activations,
    (T * top_k, block_size), when saved ((T * top_k, 2 * block_size), ``[A_gate | A_up]``, for a
    gated call: a Triton gated path that keeps another layout says so here); the CUDA path
    keeps nothing."""
    if not save or backend == "cuda" or x2d.shape[0] == 0:
        return (0,)
    return (indices.numel(), 2 * block_size if gated else block_size)


def _route_shape(x2d: Tensor, indices: Tensor, n_blocks: int, save: bool, backend: str,
                 deterministic: bool):
    if not save or x2d.shape[0] == 0:
        return (0,)
    return (_impl(backend).route_numel(x2d.shape[0], indices.shape[1], n_blocks, deterministic),)


def _check_gated_backend(backend: str, gate_keys: Tensor | None, gate_bias: Tensor | None):
    if gate_keys is None:
        if gate_bias is not None:
            raise ValueError("gate_bias is the gate table's bias: it needs gate_keys")
        return
    if not has_gated(backend):
        raise NotImplementedError(gated_unsupported_message(backend))


def _block_ffn(x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
               key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None,
               block_size: int, activation: str, backend: str, deterministic: bool,
               save_for_backward: bool, gate_keys: Tensor | None = None,
               gate_bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(y (T, d_model), saved, route): the block FFN over the given block indices, and what the
    backward reuses (empty when ``save_for_backward`` is False). With ``gate_keys`` the gated
    FFN (``keys``/``key_bias`` the up table); only on a backend with a gated path."""
    _check_gated_backend(backend, gate_keys, gate_bias)
    T, d_model = x2d.shape
    if T == 0:
        return x2d.new_zeros(0, d_model), x2d.new_empty(0), indices.new_empty(0)
    gated = {}
    if gate_keys is not None:  # a backend without a gated path keeps the plain signature
        gated = dict(gate_keys=gate_keys.contiguous(), gate_bias=_contig(gate_bias))
    y, saved, route = _impl(backend).block_ffn_fwd(
        x2d.contiguous(), keys.contiguous(), values.contiguous(), indices.contiguous(),
        _contig(key_bias), _contig(out_bias), _contig(gates), block_size=block_size,
        activation=activation, save_for_backward=save_for_backward, deterministic=deterministic,
        **gated)
    return y, saved, route


block_ffn_op = torch.library.custom_op("sfnn::block_ffn", _block_ffn, mutates_args=())


def block_ffn(*args):
    """:data:`block_ffn_op` (same arguments), or its body where nothing needs the dispatcher
    (:func:`_direct`: no gradient is recorded, so nothing is saved either)."""
    return (_block_ffn if _direct(*args) else block_ffn_op)(*args)


def avgk_ffn(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, keys: Tensor, values: Tensor,
             key_bias: Tensor | None, out_bias: Tensor | None, top_k: int, block_size: int,
             activation: str, backend: str, deterministic: bool, save_for_backward: bool,
             gate_keys: Tensor | None = None,
             gate_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Avg-K selection, then the block FFN over the chosen blocks (no gates): ``(y (T,
    d_model), indices int32 (T, top_k))``. Arguments as :data:`select_blocks_op` and
    :data:`block_ffn_op`.

    For inference (:func:`_direct` holds and nothing is saved) a backend with a fused step
    (``avgk_ffn_fwd``: the CPU kernel's one call, the CUDA extension's ``decode_step``) runs it;
    otherwise the two registered ops, ``x2d`` detached for the selection (whose indices take no
    gradient)."""
    if not save_for_backward and x2d.shape[0] and _direct(x2d, kbar, bbar, keys, values,
                                                          key_bias, out_bias, gate_keys,
                                                          gate_bias):
        fused = getattr(_impl(backend), "avgk_ffn_fwd", None)
        if fused is not None:
            _check_gated_backend(backend, gate_keys, gate_bias)
            return fused(x2d.contiguous(), kbar.contiguous(), _contig(bbar), keys.contiguous(),
                         values.contiguous(), _contig(key_bias), _contig(out_bias), top_k=top_k,
                         block_size=block_size, activation=activation,
                         gate_keys=_contig(gate_keys), gate_bias=_contig(gate_bias))
    indices = select_blocks(x2d.detach(), kbar, bbar, top_k, backend)
    y, _, _ = block_ffn(x2d, keys, values, indices, key_bias, out_bias, None, block_size,
                        activation, backend, deterministic, save_for_backward, gate_keys,
                        gate_bias)
    return y, indices


@block_ffn_op.register_fake
def _(x2d, keys, values, indices, key_bias, out_bias, gates, block_size, activation, backend,
      deterministic, save_for_backward, gate_keys=None, gate_bias=None):
    _check_gated_backend(backend, gate_keys, gate_bias)
    saved = _saved_shape(x2d, indices, block_size, save_for_backward, backend,
                         gate_keys is not None)
    route = _route_shape(x2d, indices, keys.shape[0] // block_size, save_for_backward, backend,
                         deterministic)
    return x2d.new_empty(x2d.shape), x2d.new_empty(saved), indices.new_empty(route)


@torch.library.custom_op("sfnn::block_ffn_backward", mutates_args=())
def block_ffn_backward_op(dy: Tensor, x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
                          key_bias: Tensor | None, gates: Tensor | None, saved: Tensor,
                          route: Tensor, block_size: int, activation: str, backend: str,
                          deterministic: bool, needs: list[bool],
                          gate_keys: Tensor | None = None, gate_bias: Tensor | None = None,
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys, dgate_bias) in :data:`GRAD_NAMES`
    order; a gradient not in ``needs`` (or of an absent input) is an empty tensor."""
    _check_gated_backend(backend, gate_keys, gate_bias)
    needs = _effective_needs(needs, key_bias, gates, gate_keys, gate_bias)
    inputs = (x2d, keys, values, key_bias, gates, gate_keys, gate_bias)
    if x2d.shape[0] == 0:
        grads = tuple(torch.zeros_like(t) if need else None
                      for t, need in zip(inputs, needs, strict=True))
    elif gate_keys is not None:
        grads = _impl(backend).block_ffn_bwd(
            dy.contiguous(), x2d.contiguous(), keys.contiguous(), values.contiguous(),
            indices.contiguous(), _contig(key_bias), _contig(gates), saved, route,
            block_size=block_size, activation=activation, deterministic=deterministic,
            needs=needs, gate_keys=gate_keys.contiguous(), gate_bias=_contig(gate_bias))
    else:
        impl = _impl(backend)
        plain = not has_gated(backend)  # the plain protocol: five flags, five gradients
        grads = impl.block_ffn_bwd(
            dy.contiguous(), x2d.contiguous(), keys.contiguous(), values.contiguous(),
            indices.contiguous(), _contig(key_bias), _contig(gates), saved, route,
            block_size=block_size, activation=activation, deterministic=deterministic,
            needs=needs[:len(PLAIN_GRAD_NAMES)] if plain else needs)
        grads = tuple(grads) + (None,) * (len(GRAD_NAMES) - len(grads))
    likes = (x2d, keys, values, keys, x2d, keys, keys)
    return tuple(_empty_if_none(g, like) for g, like in zip(grads, likes, strict=True))


@block_ffn_backward_op.register_fake
def _(dy, x2d, keys, values, indices, key_bias, gates, saved, route, block_size, activation,
      backend, deterministic, needs, gate_keys=None, gate_bias=None):
    _check_gated_backend(backend, gate_keys, gate_bias)
    needs = _effective_needs(needs, key_bias, gates, gate_keys, gate_bias)
    outs = (x2d, keys, values, key_bias, gates, gate_keys, gate_bias)
    likes = (x2d, keys, values, keys, x2d, keys, keys)
    return tuple(torch.empty_like(t) if need else like.new_empty(0)
                 for t, need, like in zip(outs, needs, likes, strict=True))


def _effective_needs(needs, key_bias, gates, gate_keys=None, gate_bias=None) -> tuple[bool, ...]:
    """``needs`` (one flag per :data:`GRAD_NAMES`) with the gradients of absent inputs off."""
    if len(needs) != len(GRAD_NAMES):
        raise ValueError(f"needs must hold {len(GRAD_NAMES)} flags {GRAD_NAMES}, got {needs}")
    present = (True, True, True, key_bias is not None, gates is not None, gate_keys is not None,
               gate_bias is not None)
    return tuple(bool(n) and p for n, p in zip(needs, present, strict=True))


def block_ffn_composite(x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
                        key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None,
                        block_size: int, activation: str, gate_keys: Tensor | None = None,
                        gate_bias: Tensor | None = None) -> Tensor:
    """y (T, d_model): the torch path's forward called outside the registered op, so that its
    torch ops are what autograd, forward-mode AD and ``torch.func`` differentiate (to any order).

    Same block-grouped GEMMs as ``backend="torch"`` (sparse cost, any device), but the block loop
    runs on the host and its routing is data-dependent: it serves where the registered ops cannot
    (forward-mode AD, ``torch.func.grad``/``jvp``, double backward), not for speed.
    ``indices`` is int32 (T, top_k); ``gates`` (T, top_k) in the accumulation dtype or None;
    ``gate_keys``/``gate_bias`` make it the gated FFN.
    """
    if gate_keys is not None:
        y, _, _ = torch_path.gated_block_ffn_fwd(
            x2d, keys, values, indices, key_bias, out_bias, gates, block_size=block_size,
            activation=activation, save_for_backward=False, gate_keys=gate_keys,
            gate_bias=gate_bias)
        return y
    # the grouped loop of torch ops: the CPU kernel and the few-token path are not differentiable
    y, _, _ = torch_path.grouped_block_ffn_fwd(
        x2d, keys, values, indices, key_bias, out_bias, gates, block_size=block_size,
        activation=activation, save_for_backward=False)
    return y


def _functorch_kinds() -> set:
    """The torch.func transforms active now (none while torch.compile traces: dynamo cannot
    read the interpreter stack, and applies transforms to the traced graph itself)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    return kinds - {torch._C._functorch.TransformType.Functionalize}


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jvp, jacrev, ...)."""
    return bool(_functorch_kinds())


def transform_route(*tensors: Tensor | None) -> str | None:
    """How a call on ``tensors`` is computed: None for the registered ops (also under plain
    ``torch.func.vmap``, which batches custom ops by looping over the batch);
    ``"composite"`` (:func:`block_ffn_composite`, sparse) under forward-mode AD and
    ``torch.func.grad``/``vjp``/``jvp``/``jacrev``, whose registered-op path has no rule
    (custom ops give no forward-mode tangents and reject ``torch.func.grad``); ``"dense"`` (the
    dense-masked reference, which every transform can batch) where ``vmap`` meets another
    transform, because the composite's routing is data-dependent and cannot be batched."""
    if torch.compiler.is_compiling():
        return None
    kinds = _functorch_kinds()
    if kinds:
        if kinds == {torch._C._functorch.TransformType.Vmap}:
            return None
        return "dense" if torch._C._functorch.TransformType.Vmap in kinds else "composite"
    if fwAD._current_level >= 0 and any(
            t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        return "composite"
    return None


def _block_ffn_setup_context(ctx, inputs, output):
    # Trailing arguments left at their defaults (gate_keys, gate_bias = None) may be absent,
    # here and in ctx.needs_input_grad.
    (x2d, keys, values, indices, key_bias, out_bias, gates, block_size, activation, backend,
     deterministic, _save, gate_keys, gate_bias) = tuple(inputs) + (None,) * (14 - len(inputs))
    ctx.save_for_backward(x2d, keys, values, indices, key_bias, gates, output[1], output[2],
                          gate_keys, gate_bias)
    ctx.config = (block_size, activation, backend, deterministic)


def _differentiable_grads(dy, x2d, keys, values, indices, key_bias, gates, needs, block_size,
                          activation, gate_keys=None, gate_bias=None):
    """The gradients as functions of the inputs and ``dy`` (``create_graph=True``): the composite
    forward is recomputed and differentiated by autograd, so a second backward has a graph."""
    inputs = (x2d, keys, values, key_bias, gates, gate_keys, gate_bias)
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    with torch.enable_grad():
        y = block_ffn_composite(x2d, keys, values, indices, key_bias, None, gates, block_size,
                                activation, gate_keys, gate_bias)
    got = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True,
                                   materialize_grads=True))
    return tuple(next(got) if need else None for need in needs)


def _block_ffn_backward(ctx, dy, _dsaved, _droute):
    x2d, keys, values, indices, key_bias, gates, saved, route, gate_keys, gate_bias = \
        ctx.saved_tensors
    block_size, activation, backend, deterministic = ctx.config
    need = tuple(ctx.needs_input_grad) + (False,) * (14 - len(ctx.needs_input_grad))
    needs = _effective_needs([need[0], need[1], need[2], need[4], need[6], need[12], need[13]],
                             key_bias, gates, gate_keys, gate_bias)
    if torch.is_grad_enabled() and any(needs):
        # Autograd runs a backward with grad mode on only under create_graph=True: the
        # gradients must be differentiable, which the kernels' gradients are not.
        grads = _differentiable_grads(dy, x2d, keys, values, indices, key_bias, gates, needs,
                                      block_size, activation, gate_keys, gate_bias)
    elif any(needs):
        grads = block_ffn_backward_op(
            dy, x2d, keys, values, indices, key_bias, gates, saved, route, block_size,
            activation, backend, deterministic, list(needs), gate_keys, gate_bias)
        grads = tuple(g if n else None for g, n in zip(grads, needs, strict=True))
    else:  # only out_bias needs a gradient: the kernels have nothing to do
        grads = (None,) * len(GRAD_NAMES)
    dx, dkeys, dvalues, dkb, dgates, dgate_keys, dgate_bias = grads
    dout_bias = None
    if need[5]:
        dout_bias = dy.sum(0, dtype=means_dtype(dy.dtype)).to(dy.dtype)
    if dgates is not None:
        dgates = dgates.to(gates.dtype)
    return (dx, dkeys, dvalues, None, dkb, dout_bias, dgates, None, None, None, None, None,
            dgate_keys, dgate_bias)[:len(ctx.needs_input_grad)]


block_ffn_op.register_autograd(_block_ffn_backward, setup_context=_block_ffn_setup_context)
