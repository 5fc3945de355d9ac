"""The public functional API: validation, autocast, block means, then the op layer.

Shapes: ``x`` is (..., d_model) with any number of leading dims (flattened to T tokens);
``keys`` and ``values`` are (d_ff, d_model) (``values`` is ``fc2.weight.T``); ``key_bias`` is
(d_ff,); ``out_bias`` is (d_model,); block ``b`` holds cells ``[b*g, (b+1)*g)``.

Block means are recomputed on every call unless the caller passes a
:class:`~sfnn.cache.BlockMeansCache` it owns (``SparseFFN`` passes its own in eval mode).
Under forward-mode AD and ``torch.func`` transforms the layer is computed from differentiable
torch ops (see :func:`sfnn.ops.transform_route`).
"""
from __future__ import annotations

import contextlib

import torch

from . import ops, reference, torch_path
from ._activations import ACTIVATIONS
from .cache import BlockMeansCache, fresh_block_means

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = ["block_means", "select_blocks", "block_ffn", "sparse_ffn"]


def _check_tensor(name: str, t, *, dim: int | None = None, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return v


def _check_choice(name: str, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


def _check_weights(keys, values, key_bias, out_bias, block_size) -> tuple[int, int, int]:
    """Validate the FFN tables; returns (d_ff, d_model, n_blocks)."""
    _check_tensor("keys", keys, dim=2)
    _check_tensor("values", values, dim=2)
    if values.shape != keys.shape:
        raise ValueError(f"keys and values must both be (d_ff, d_model); got keys "
                         f"{tuple(keys.shape)} and values {tuple(values.shape)}")
    d_ff, d_model = keys.shape
    _check_int("block_size", block_size)
    if d_ff % block_size:
        raise ValueError(f"block_size={block_size} must divide d_ff={d_ff}")
    _check_tensor("key_bias", key_bias, dim=1, optional=True)
    if key_bias is not None and key_bias.shape[0] != d_ff:
        raise ValueError(f"key_bias must be (d_ff,) = ({d_ff},), got {tuple(key_bias.shape)}")
    _check_tensor("out_bias", out_bias, dim=1, optional=True)
    if out_bias is not None and out_bias.shape[0] != d_model:
        raise ValueError(f"out_bias must be (d_model,) = ({d_model},), got "
                         f"{tuple(out_bias.shape)}")
    return d_ff, d_model, d_ff // block_size


def _check_x(x, d_model: int) -> None:
    _check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != d_model:
        raise ValueError(f"x must be (..., d_model) with d_model={d_model}, got {tuple(x.shape)}")


def _harmonise(named: dict) -> tuple[dict, str | None]:
    """Check that the tensors share one device and dtype, or cast them as autocast would.

    Under ``torch.autocast`` the tensors are cast to the autocast dtype as ``nn.Linear``'s are:
    float64 tensors are left alone (all-float64 inputs stay float64; float64 mixed with others
    is an error, as it is for ``nn.Linear``). The returned device type names the autocast to
    suspend around the kernels.
    """
    present = {k: v for k, v in named.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k}: {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    device_type = next(iter(devices)).type
    autocast = None
    if torch.is_autocast_enabled(device_type):
        autocast = device_type
        dtype = torch.get_autocast_dtype(device_type)
        named = {k: (v if v is None or v.dtype == torch.float64 else v.to(dtype))
                 for k, v in named.items()}
        present = {k: v for k, v in named.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}: {v.dtype}" for k, v in present.items())
        hint = ("torch.autocast leaves float64 tensors alone, as it does for nn.Linear"
                if autocast else "or run under torch.autocast")
        raise TypeError(f"all tensors must share one dtype ({hint}); got {listing}")
    return named, autocast


def _autocast_off(device_type: str | None):
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _deterministic(flag: bool) -> bool:
    return bool(flag) or torch.are_deterministic_algorithms_enabled()


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _means(keys: Tensor, key_bias: Tensor | None, block_size: int, backend: str,
           means_cache: BlockMeansCache | None) -> tuple[Tensor, Tensor | None]:
    """The block means for a call: from ``means_cache`` when given (it decides whether it may
    serve), else computed now. Under torch.func transforms from plain torch ops."""
    if ops.functorch_active():
        return torch_path.block_means(keys.detach(), _detach(key_bias), block_size)
    if means_cache is not None:
        return means_cache._lookup(keys, key_bias, block_size, backend)
    return fresh_block_means(keys, key_bias, block_size, backend)


def _check_cache(means_cache) -> None:
    if means_cache is not None and not isinstance(means_cache, BlockMeansCache):
        raise TypeError(f"means_cache must be a sfnn.BlockMeansCache or None, got "
                        f"{type(means_cache).__name__}")


def block_means(keys: Tensor, key_bias: Tensor | None = None, *, block_size: int,
                backend: str = "auto",
                means_cache: BlockMeansCache | None = None) -> tuple[Tensor, Tensor | None]:
    """Mean key and mean key bias of every block of ``block_size`` consecutive cells.

    Args:
        keys: (d_ff, d_model) float tensor (``fc1.weight``).
        key_bias: (d_ff,) or None (``fc1.bias``).
        block_size: cells per block; must divide d_ff.
        backend: "auto", "torch", "triton", "cuda" or "reference".
        means_cache: a :class:`sfnn.BlockMeansCache` the caller owns, or None (compute now).

    Returns:
        ``kbar`` (n_blocks, d_model) and ``bbar`` (n_blocks,), or None without ``key_bias``;
        float32 (float64 for float64 keys), detached, and the caller's own: writing them changes
        no cache.

    Caching: without ``means_cache`` nothing is cached. A cache serves only where the keys take
    no part in autograd (and never under torch.compile tracing, torch.func transforms or CUDA
    graph capture) and is invalidated by every optimizer step, by in-place updates that bump
    the version counter and by :func:`sfnn.refresh_block_means`; ``SparseFFN`` uses its own in
    eval mode and also clears it on ``train()``/``eval()``, ``load_state_dict`` and ``to()``.
    **Unseen**: writes that bypass the version counter (``param.data`` writes, numpy aliases,
    ``dist.broadcast`` and other collectives, ``vector_to_parameters`` then writes to the
    vector) with no optimizer step after them. After such a write call
    ``sfnn.refresh_block_means(model)``.

    Example:
        >>> kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=64)
    """
    _check_choice("backend", backend, ops.BACKENDS)
    _check_weights(keys, keys, key_bias, None, block_size)
    _check_cache(means_cache)
    if backend == "reference":
        return reference.block_means_ref(keys, key_bias, block_size)
    be = ops.resolve_backend(backend, keys.device, 0, False, keys.dtype)
    kbar, bbar = _means(keys, key_bias, block_size, be, means_cache)
    if means_cache is not None:  # the cache's own tensors: hand out copies
        kbar, bbar = kbar.clone(), (None if bbar is None else bbar.clone())
    return kbar, bbar


def select_blocks(x: Tensor, kbar: Tensor, bbar: Tensor | None = None, top_k: int = 1, *,
                  backend: str = "auto") -> Tensor:
    """Avg-K selection: each token's ``top_k`` blocks of largest ``x . kbar_b + bbar_b``.

    Args:
        x: (..., d_model) float tensor.
        kbar: (n_blocks, d_model) block means (float32 from :func:`block_means`).
        bbar: (n_blocks,) or None.
        top_k: blocks per token, 1 <= top_k <= n_blocks.

    Returns:
        int32 (..., top_k) block indices, best first; ties go to the smaller block index.
        Scores are computed in float32 (float64 for float64 ``x``, with ``kbar``/``bbar`` taken
        to float64: float64 scores are ranked at float64 resolution). No gradient flows.
    """
    _check_choice("backend", backend, ops.BACKENDS)
    _check_tensor("kbar", kbar, dim=2)
    n_blocks, d_model = kbar.shape
    _check_x(x, d_model)
    _check_tensor("bbar", bbar, dim=1, optional=True)
    if bbar is not None and bbar.shape[0] != n_blocks:
        raise ValueError(f"bbar must be (n_blocks,) = ({n_blocks},), got {tuple(bbar.shape)}")
    _check_int("top_k", top_k)
    if top_k > n_blocks:
        raise ValueError(f"top_k={top_k} must be <= n_blocks={n_blocks}")
    if len({t.device for t in (x, kbar, bbar) if t is not None}) > 1:
        raise ValueError("x, kbar and bbar must be on one device")
    x2d = x.detach().reshape(-1, d_model)
    if backend == "reference":
        idx = reference.select_blocks_ref(x2d, kbar, bbar, top_k)
    else:
        dtype = ops.means_dtype(x.dtype)
        kbar, bbar = kbar.detach().to(dtype), (None if bbar is None else bbar.detach().to(dtype))
        be = ops.resolve_backend(backend, x.device, x2d.shape[0], False, x.dtype)
        idx = _select(x2d, kbar, bbar, top_k, be, ops.transform_route(x, kbar, bbar))
    return idx.reshape(*x.shape[:-1], top_k)


def _select(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int, backend: str,
            route: str | None) -> Tensor:
    """int32 (T, top_k) on ``x2d.detach()``: the registered op, or plain torch ops on a
    transform's route (see :func:`sfnn.ops.transform_route`)."""
    x2d = x2d.detach()
    if route == "dense":
        return reference.select_blocks_ref(x2d, kbar, bbar, top_k)
    if route == "composite":
        return torch_path.select_blocks(x2d, kbar, bbar, top_k)
    return ops.select_blocks_op(x2d, kbar, bbar, top_k, backend)


def _check_indices(indices, x: Tensor, n_blocks: int, name: str = "indices") -> Tensor:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != x.dim() or indices.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{name} must be (..., top_k) with the leading dims of x "
                         f"{tuple(x.shape[:-1])}, got {tuple(indices.shape)}")
    if indices.shape[-1] < 1:
        raise ValueError(f"{name} must hold at least one block per token")
    if indices.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {indices.device}")
    idx2d = indices.reshape(-1, indices.shape[-1])
    # Checked in the given dtype, before the int32 cast (int64 values past 2**31 would wrap).
    # Not under torch.compile tracing or torch.func transforms (no host read there).
    if idx2d.numel() and not torch.compiler.is_compiling() and not ops.functorch_active():
        in_range = ((idx2d >= 0) & (idx2d < n_blocks)).all()
        if idx2d.device.type == "cpu":
            if not bool(in_range):
                raise ValueError(f"{name} must lie in [0, n_blocks={n_blocks})")
        else:  # no host sync on the GPU: a device-side assert instead
            torch._assert_async(in_range, f"{name} must lie in [0, n_blocks={n_blocks})")
    return idx2d.to(torch.int32).contiguous()


def block_ffn(x: Tensor, keys: Tensor, values: Tensor, indices: Tensor, *, block_size: int,
              key_bias: Tensor | None = None, out_bias: Tensor | None = None,
              gates: Tensor | None = None, activation: str = "relu", backend: str = "auto",
              deterministic: bool = False) -> Tensor:
    """The block FFN over given blocks: the compute half of :func:`sparse_ffn`.

    ``y_t = sum_j gates[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i
    + out_bias`` (gates default to 1; a block listed twice counts twice).

    Args:
        x: (..., d_model). keys, values: (d_ff, d_model). indices: (..., top_k) int32/int64 in
        [0, n_blocks). gates: (..., top_k) float or None; its gradient is returned.
        deterministic: bitwise-repeatable results (also on under
        ``torch.use_deterministic_algorithms(True)``).

    Returns:
        (..., d_model) in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("backend", backend, ops.BACKENDS)
    d_ff, d_model, n_blocks = _check_weights(keys, values, key_bias, out_bias, block_size)
    _check_x(x, d_model)
    idx2d = _check_indices(indices, x, n_blocks)
    if gates is not None:
        _check_tensor("gates", gates)
        if gates.shape != indices.shape:
            raise ValueError(f"gates must have indices' shape {tuple(indices.shape)}, got "
                             f"{tuple(gates.shape)}")
        if gates.device != x.device:
            raise ValueError(f"gates must be on x's device {x.device}, got {gates.device}")
    t, autocast_device = _harmonise(dict(x=x, keys=keys, values=values, key_bias=key_bias,
                                         out_bias=out_bias))
    x2d = t["x"].reshape(-1, d_model)
    gates2d = None
    if gates is not None:
        acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        gates2d = gates.reshape(-1, gates.shape[-1]).to(acc)
    kernel_grad = _needs_grad(x, keys, values, key_bias, gates)
    route = ops.transform_route(*t.values(), gates)
    if route is not None and backend != "reference":  # still refuse a backend that cannot run
        ops.resolve_backend(backend, x.device, x2d.shape[0], False, x2d.dtype)
    with _autocast_off(autocast_device):
        if backend == "reference" or route == "dense":
            y2d = reference.block_ffn_ref(x2d, t["keys"], t["values"], idx2d,
                                          block_size=block_size, key_bias=t["key_bias"],
                                          out_bias=t["out_bias"], gates=gates2d,
                                          activation=activation)
        elif route == "composite":
            y2d = ops.block_ffn_composite(x2d, t["keys"], t["values"], idx2d, t["key_bias"],
                                          t["out_bias"], gates2d, block_size, activation)
        else:
            be = ops.resolve_backend(backend, x.device, x2d.shape[0], kernel_grad, x2d.dtype)
            y2d, _, _ = ops.block_ffn_op(x2d, t["keys"], t["values"], idx2d, t["key_bias"],
                                         t["out_bias"], gates2d, block_size, activation, be,
                                         _deterministic(deterministic), kernel_grad)
    return y2d.reshape(x.shape[:-1] + (d_model,))


def sparse_ffn(x: Tensor, keys: Tensor, values: Tensor, *, block_size: int, top_k: int,
               key_bias: Tensor | None = None, out_bias: Tensor | None = None,
               activation: str = "relu", backend: str = "auto",
               deterministic: bool = False,
               means_cache: BlockMeansCache | None = None) -> Tensor:
    """The Avg-K sparse FFN: score blocks by their mean key, keep the top_k, compute only those.

    ``y_t = sum_{b in S_t} sum_{i in b} act(x_t . k_i + b_i) v_i + out_bias`` where ``S_t`` holds
    the ``top_k`` blocks of largest ``x_t . kbar_b + bbar_b`` (no gate, no renormalisation).
    ``top_k == d_ff // block_size`` is exactly the dense FFN.

    Args:
        x: (..., d_model) float16/bfloat16/float32/float64; any leading dims, possibly empty.
        keys: (d_ff, d_model) (``fc1.weight``); values: (d_ff, d_model) (``fc2.weight.T``).
        block_size: cells per block g (divides d_ff). top_k: blocks per token.
        key_bias: (d_ff,) or None. out_bias: (d_model,) or None.
        activation: "relu", "gelu" (exact erf) or "silu".
        backend: "auto" (Triton for CUDA tensors when available, the CUDA extension for a few
            tokens without gradients when built, else torch), "torch", "triton", "cuda" or
            "reference" (dense-masked oracle).
        deterministic: bitwise-repeatable results.
        means_cache: a :class:`sfnn.BlockMeansCache` the caller owns, reused across calls
            where the keys take no part in autograd (decoding); None recomputes the block
            means (one read of ``keys``) on every call. See :func:`block_means` for what a
            cache sees and what it does not.

    Returns:
        (..., d_model) in x's dtype (the autocast dtype under ``torch.autocast``, which, as for
        ``nn.Linear``, leaves float64 alone). Gradients flow to x, keys, values and both biases
        through the selected cells only.

    Autodiff: reverse mode through the registered ops; double backward (``create_graph=True``),
    forward-mode AD and ``torch.func`` transforms (grad, jvp, vmap, jacrev, ...) are supported
    through differentiable torch ops (the torch path's, or the dense-masked reference where
    vmap is combined with another transform), whatever ``backend`` says.

    Example:
        >>> x = torch.randn(2, 10, 512)
        >>> keys, values = torch.randn(8192, 512), torch.randn(8192, 512)
        >>> y = sfnn.sparse_ffn(x, keys, values, block_size=64, top_k=16, activation="gelu")
    """
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("backend", backend, ops.BACKENDS)
    d_ff, d_model, n_blocks = _check_weights(keys, values, key_bias, out_bias, block_size)
    _check_x(x, d_model)
    _check_cache(means_cache)
    _check_int("top_k", top_k)
    if top_k > n_blocks:
        raise ValueError(f"top_k={top_k} must be <= n_blocks = d_ff // block_size = {n_blocks}")
    t, autocast_device = _harmonise(dict(x=x, keys=keys, values=values, key_bias=key_bias,
                                         out_bias=out_bias))
    if backend == "reference":
        with _autocast_off(autocast_device):
            return reference.sparse_ffn_ref(t["x"], t["keys"], t["values"], block_size=block_size,
                                            top_k=top_k, key_bias=t["key_bias"],
                                            out_bias=t["out_bias"], activation=activation)
    x2d = t["x"].reshape(-1, d_model)
    # Gradients the kernels compute (out_bias's is dy summed, taken by the op layer).
    kernel_grad = _needs_grad(x, keys, values, key_bias)
    route = ops.transform_route(*t.values())
    be = ops.resolve_backend(backend, x.device, x2d.shape[0], kernel_grad and route is None,
                             x2d.dtype)
    with _autocast_off(autocast_device):
        if route == "dense":
            return reference.sparse_ffn_ref(t["x"], t["keys"], t["values"], block_size=block_size,
                                            top_k=top_k, key_bias=t["key_bias"],
                                            out_bias=t["out_bias"], activation=activation)
        if route is not None:
            be = "torch"
        # Means come from the parameters themselves, not the autocast copies.
        kbar, bbar = _means(keys, key_bias, block_size, be, means_cache)
        indices = _select(x2d, kbar, bbar, top_k, be, route)
        if route == "composite":
            y2d = ops.block_ffn_composite(x2d, t["keys"], t["values"], indices, t["key_bias"],
                                          t["out_bias"], None, block_size, activation)
        else:
            y2d, _, _ = ops.block_ffn_op(x2d, t["keys"], t["values"], indices, t["key_bias"],
                                         t["out_bias"], None, block_size, activation, be,
                                         _deterministic(deterministic), kernel_grad)
    return y2d.reshape(x.shape[:-1] + (d_model,))
