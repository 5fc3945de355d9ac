"""The public functional API: validation, autocast, block means, then the op layer.

Shapes: ``x`` is (..., d_model) with any number of leading dims (flattened to T tokens);
``keys`` and ``values`` are (d_ff, d_model) (``values`` is ``fc2.weight.T``); ``key_bias`` is
(d_ff,); ``out_bias`` is (d_model,); block ``b`` holds cells ``[b*g, (b+1)*g)``.

Selection: :func:`sparse_ffn` takes ``selection=`` (``"avgk"``, ``"switch"``, ``"moe"``,
``"hash"``, ``"random"``; decided in :mod:`sfnn.selection`) and returns the
:class:`sfnn.Selection` (indices, gates, aux loss) on request.

Block means are recomputed on every call unless the caller passes a
:class:`~sfnn.cache.BlockMeansCache` it owns (``SparseFFN`` passes its own in eval mode).
Under forward-mode AD and ``torch.func`` transforms the layer is computed from differentiable
torch ops (see :func:`sfnn.ops.transform_route`).
"""
from __future__ import annotations

import contextlib

import torch

from . import ops, reference, torch_path
from . import selection as selection_lib
from ._activations import ACTIVATIONS
from .cache import BlockMeansCache, fresh_block_means
from .selection import METHODS, ROUTER_METHODS, Selection

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


def _check_gate_tables(gate_keys, gate_bias, keys) -> bool:
    """Validate a gated FFN's gate table against the (up) ``keys``; True when gated."""
    if gate_keys is None:
        if gate_bias is not None:
            raise ValueError("gate_bias is the gate table's bias and needs gate_keys: pass "
                             "gate_keys=(d_ff, d_model) (gate_proj.weight) too, or drop gate_bias")
        return False
    _check_tensor("gate_keys", gate_keys, dim=2)
    if gate_keys.shape != keys.shape:
        raise ValueError(f"gate_keys must be (d_ff, d_model) like keys {tuple(keys.shape)}, got "
                         f"{tuple(gate_keys.shape)}")
    _check_tensor("gate_bias", gate_bias, dim=1, optional=True)
    if gate_bias is not None and gate_bias.shape[0] != keys.shape[0]:
        raise ValueError(f"gate_bias must be (d_ff,) = ({keys.shape[0]},), got "
                         f"{tuple(gate_bias.shape)}")
    return True


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
    present = [v for v in named.values() if v is not None]
    device = present[0].device
    if any(v.device != device for v in present):
        listing = ", ".join(f"{k}: {v.device}" for k, v in named.items() if v is not None)
        raise ValueError(f"all tensors must be on one device; got {listing}")
    autocast = None
    if torch.is_autocast_enabled(device.type):
        autocast = device.type
        dtype = torch.get_autocast_dtype(autocast)
        named = {k: (v if v is None or v.dtype == torch.float64 else v.to(dtype))
                 for k, v in named.items()}
        present = [v for v in named.values() if v is not None]
    dtype = present[0].dtype
    if any(v.dtype != dtype for v in present):
        listing = ", ".join(f"{k}: {v.dtype}" for k, v in named.items() if v is not None)
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
    """int32 (T, top_k) Avg-K blocks on ``x2d.detach()`` (see
    :func:`sfnn.selection.avgk_indices`)."""
    return selection_lib.avgk_indices(x2d, kbar, bbar, top_k, backend, route)


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
              deterministic: bool = False, gate_keys: Tensor | None = None,
              gate_bias: Tensor | None = None) -> Tensor:
    """The block FFN over given blocks: the compute half of :func:`sparse_ffn`.

    ``y_t = sum_j gates[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i
    + out_bias`` (gates default to 1; a block listed twice counts twice). With ``gate_keys``
    (d_ff, d_model) (and ``gate_bias`` (d_ff,)) the gated FFN: the cell is
    ``act(x_t . kg_i + bg_i) * (x_t . k_i + b_i)`` (see :func:`sparse_ffn`).

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
    gated = _check_gate_tables(gate_keys, gate_bias, keys)
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
                                         out_bias=out_bias, gate_keys=gate_keys,
                                         gate_bias=gate_bias))
    x2d = t["x"].reshape(-1, d_model)
    gates2d = None
    if gates is not None:
        acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        gates2d = gates.reshape(-1, gates.shape[-1]).to(acc)
    kernel_grad = _needs_grad(x, keys, values, key_bias, gates, gate_keys, gate_bias)
    route = ops.transform_route(*t.values(), gates)
    if route is not None and backend != "reference":  # still refuse a backend that cannot run
        ops.resolve_backend(backend, x.device, x2d.shape[0], False, x2d.dtype, gated=gated)
    with _autocast_off(autocast_device):
        if backend == "reference" or route == "dense":
            y2d = reference.block_ffn_ref(x2d, t["keys"], t["values"], idx2d,
                                          block_size=block_size, key_bias=t["key_bias"],
                                          out_bias=t["out_bias"], gates=gates2d,
                                          activation=activation, gate_keys=t["gate_keys"],
                                          gate_bias=t["gate_bias"])
        elif route == "composite":
            y2d = ops.block_ffn_composite(x2d, t["keys"], t["values"], idx2d, t["key_bias"],
                                          t["out_bias"], gates2d, block_size, activation,
                                          t["gate_keys"], t["gate_bias"])
        else:
            be = ops.resolve_backend(backend, x.device, x2d.shape[0], kernel_grad, x2d.dtype,
                                     gated=gated)
            y2d, _, _ = ops.block_ffn(x2d, t["keys"], t["values"], idx2d, t["key_bias"],
                                      t["out_bias"], gates2d, block_size, activation, be,
                                      _deterministic(deterministic), kernel_grad,
                                      t["gate_keys"], t["gate_bias"])
    return y2d.reshape(x.shape[:-1] + (d_model,))


def _check_weight(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {v!r}")
    return float(v)


def _check_in_range(t: Tensor, high: int, message: str) -> None:
    """Raise ValueError(message) unless every value of the integer tensor ``t`` lies in
    ``[0, high)``: on the CPU at once; on CUDA a device-side assert (no host sync); not while
    torch.compile traces or a torch.func transform runs (no host read there)."""
    if not t.numel() or torch.compiler.is_compiling() or ops.functorch_active():
        return
    in_range = ((t >= 0) & (t < high)).all()
    if t.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(message)
    else:
        torch._assert_async(in_range, message)


def _check_selection(selection, x: Tensor, n_blocks: int, top_k: int, router_weight, token_ids,
                     hash_table, seed) -> Tensor | None:
    """Validate a selection method's arguments; returns the flat token ids (hash) or None."""
    _check_choice("selection", selection, METHODS)
    d_model = x.shape[-1]
    if selection in ROUTER_METHODS:
        if router_weight is None:
            raise ValueError(
                f"selection={selection!r} needs router_weight, the (n_blocks, d_model) = "
                f"({n_blocks}, {d_model}) router (SparseFFN(..., selection={selection!r}) owns "
                f"one as its router_weight parameter)")
        _check_tensor("router_weight", router_weight, dim=2)
        if tuple(router_weight.shape) != (n_blocks, d_model):
            raise ValueError(f"router_weight must be (n_blocks, d_model) = ({n_blocks}, "
                             f"{d_model}), got {tuple(router_weight.shape)}")
    elif router_weight is not None:
        raise ValueError(f"router_weight is used only by selection='switch' or 'moe', not "
                         f"{selection!r}: drop it, or choose a router method")
    if selection != "hash" and hash_table is not None:
        raise ValueError(f"hash_table is used only by selection='hash', not {selection!r}")
    if selection != "random" and seed is not None:
        raise ValueError(f"seed is used only by selection='random', not {selection!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(
            seed, (int, torch.Tensor, torch.Generator))):
        raise TypeError(f"seed must be an int, an int64 tensor, a torch.Generator or None, got "
                        f"{type(seed).__name__}")
    if isinstance(seed, torch.Tensor) and (seed.numel() != 1 or seed.dtype.is_floating_point
                                           or seed.dtype == torch.bool):
        raise TypeError(f"a seed tensor must hold one integer, got {seed.dtype} "
                        f"{tuple(seed.shape)}")
    if selection != "hash":
        return None  # token ids are accepted and ignored by the other methods
    if hash_table is None:
        raise ValueError("selection='hash' needs hash_table, the (vocab_size, top_k) map from "
                         "token id to blocks: sfnn.balanced_hash_table(vocab_size, n_blocks, "
                         "top_k, seed=0) (SparseFFN(..., selection='hash', vocab_size=V) builds "
                         "and keeps one)")
    if not isinstance(hash_table, torch.Tensor) or hash_table.dtype.is_floating_point or \
            hash_table.dtype == torch.bool or hash_table.dim() != 2:
        raise TypeError("hash_table must be a 2-D integer tensor (vocab_size, top_k)")
    if hash_table.shape[1] != top_k:
        raise ValueError(f"hash_table must be (vocab_size, top_k={top_k}), got "
                         f"{tuple(hash_table.shape)}: build it with the layer's top_k")
    if hash_table.device != x.device:
        raise ValueError(f"hash_table must be on x's device {x.device}, got {hash_table.device}")
    vocab = hash_table.shape[0]
    if token_ids is None:
        raise ValueError("selection='hash' needs the tokens' ids: call ffn(x, token_ids=ids) "
                         "(or sparse_ffn(..., token_ids=ids)) with ids of x's leading shape "
                         f"{tuple(x.shape[:-1])}")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point or \
            token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)}")
    if token_ids.shape != x.shape[:-1]:
        raise ValueError(f"token_ids must have x's leading shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(token_ids.shape)}")
    if token_ids.device != x.device:
        raise ValueError(f"token_ids must be on x's device {x.device}, got {token_ids.device}")
    _check_in_range(hash_table, n_blocks, f"hash_table entries must lie in [0, n_blocks="
                                          f"{n_blocks})")
    ids = token_ids.reshape(-1)
    _check_in_range(ids, vocab, f"token_ids must lie in [0, vocab_size={vocab}): the hash table "
                                f"has {vocab} rows; build the layer with a vocab_size that "
                                f"covers the tokenizer's vocabulary")
    return ids


def sparse_ffn(x: Tensor, keys: Tensor, values: Tensor, *, block_size: int, top_k: int,
               key_bias: Tensor | None = None, out_bias: Tensor | None = None,
               activation: str = "relu", backend: str = "auto",
               deterministic: bool = False,
               means_cache: BlockMeansCache | None = None,
               selection: str = "avgk", router_weight: Tensor | None = None,
               token_ids: Tensor | None = None, hash_table: Tensor | None = None,
               seed=None, balance_loss_weight: float = 0.01, z_loss_weight: float = 0.0,
               return_selection: bool = False, gate_keys: Tensor | None = None,
               gate_bias: Tensor | None = None):
    """The sparse FFN: choose each token's ``top_k`` blocks, compute only those.

    ``y_t = sum_{j} gate[t, j] * sum_{i in block S_t[j]} act(x_t . k_i + b_i) v_i + out_bias``.
    With the default ``selection="avgk"``, ``S_t`` holds the ``top_k`` blocks of largest
    ``x_t . kbar_b + bbar_b`` and every gate is 1 (no gate, no renormalisation);
    ``top_k == d_ff // block_size`` is then exactly the dense FFN, and ``block_size=1`` is the
    exact top-k over cells (the paper's unrestricted memory).

    Gated FFNs (SwiGLU with ``activation="silu"``, GeGLU with ``"gelu"``): given ``gate_keys``
    (d_ff, d_model) (``gate_proj.weight``) and optionally ``gate_bias`` (d_ff,), the cell is
    ``h_i = act(x_t . kg_i + bg_i) * (x_t . k_i + b_i)``: ``keys``/``key_bias`` are the *up* table
    (``up_proj``, linear), ``values`` is ``down_proj.weight.T``. Avg-K then scores the gate
    table's block means, ``x_t . mean_b(kg) + mean_b(bg)``. ``gate_bias`` without ``gate_keys``
    is an error. Not to be confused with the selection methods' ``gates`` (per-slot weights),
    which multiply a gated block's output as they do a plain one's.

    The other selection methods (the paper's comparison; :mod:`sfnn.selection`):

    - ``"switch"``: top_k of the router logits ``x W_r^T``, each block's output scaled by its
      softmax probability (Switch Transformer; its top_k is 1). Needs ``router_weight``.
    - ``"moe"``: the same top_k, scaled by the softmax over the chosen logits (renormalised).
    - ``"hash"``: HashLayer, a fixed map from token id to blocks: needs ``token_ids`` and
      ``hash_table`` (:func:`sfnn.balanced_hash_table`).
    - ``"random"``: top_k distinct blocks drawn uniformly per token per call (a control), from
      ``seed``: an int or int64 tensor (the same seed, the same draws, on every device), a
      ``torch.Generator`` (a fresh draw from it), or None (a fresh draw from the default
      generator of x's device, reproducible under ``torch.manual_seed``).

    Routing is **dropless**: no capacity factor, no token dropped, whatever a block's load.

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
            cache sees and what it does not. Only ``avgk`` reads block means.
        selection: "avgk" (default), "switch", "moe", "hash" or "random".
        router_weight: (n_blocks, d_model) router of switch/moe (logits in float32).
        token_ids: x's leading shape, integer in [0, vocab_size) (hash; ignored otherwise).
        hash_table: (vocab_size, top_k) integer in [0, n_blocks) (hash).
        seed: the random method's seed (see above).
        balance_loss_weight, z_loss_weight: weights of the router's losses in
            ``Selection.aux_loss`` (Switch's 0.01; ST-MoE's z-loss weight is 0.001).
        return_selection: also return the :class:`sfnn.Selection` (indices, gates, aux_loss,
            balance_loss, z_loss), the only way the functional form hands out the aux loss.
        gate_keys: (d_ff, d_model) gate table of a gated FFN, or None (plain FFN).
        gate_bias: (d_ff,) its bias, or None (needs ``gate_keys``).

    Returns:
        (..., d_model) in x's dtype (the autocast dtype under ``torch.autocast``, which, as for
        ``nn.Linear``, leaves float64 alone), or ``(y, Selection)`` with ``return_selection``.
        Gradients flow to x, keys, values and both biases through the selected cells only, and,
        for switch/moe, to ``router_weight`` and ``x`` through the gates and the aux loss.

    Autodiff: reverse mode through the registered ops; double backward (``create_graph=True``),
    forward-mode AD and ``torch.func`` transforms (grad, jvp, vmap, jacrev, ...) are supported
    through differentiable torch ops (the torch path's, or the dense-masked reference where
    vmap is combined with another transform), whatever ``backend`` says.

    Example:
        >>> x = torch.randn(2, 10, 512)
        >>> keys, values = torch.randn(8192, 512), torch.randn(8192, 512)
        >>> y = sfnn.sparse_ffn(x, keys, values, block_size=64, top_k=16, activation="gelu")
        >>> router = torch.randn(128, 512) * 0.01
        >>> y, sel = sfnn.sparse_ffn(x, keys, values, block_size=64, top_k=1, selection="switch",
        ...                          router_weight=router, return_selection=True)
        >>> loss = y.square().mean() + sel.aux_loss
    """
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("backend", backend, ops.BACKENDS)
    d_ff, d_model, n_blocks = _check_weights(keys, values, key_bias, out_bias, block_size)
    gated = _check_gate_tables(gate_keys, gate_bias, keys)
    _check_x(x, d_model)
    _check_cache(means_cache)
    _check_int("top_k", top_k)
    if top_k > n_blocks:
        raise ValueError(f"top_k={top_k} must be <= n_blocks = d_ff // block_size = {n_blocks}")
    ids = _check_selection(selection, x, n_blocks, top_k, router_weight, token_ids, hash_table,
                           seed)
    bw = _check_weight("balance_loss_weight", balance_loss_weight)
    zw = _check_weight("z_loss_weight", z_loss_weight)
    t, autocast_device = _harmonise(dict(x=x, keys=keys, values=values, key_bias=key_bias,
                                         out_bias=out_bias, router_weight=router_weight,
                                         gate_keys=gate_keys, gate_bias=gate_bias))
    if selection == "random":
        seed = selection_lib.resolve_seed(seed, x.device)
    lead = x.shape[:-1]
    flat = x.dim() == 2  # (T, d_model) already: no reshapes in or out (a decode step's shape)
    x2d = t["x"] if flat else t["x"].reshape(-1, d_model)
    # Gradients the kernels compute (out_bias's is dy summed, taken by the op layer); a
    # router's gradient comes through the gates' gradient.
    kernel_grad = _needs_grad(x, keys, values, key_bias, router_weight, gate_keys, gate_bias)
    route = None if backend == "reference" else ops.transform_route(*t.values())
    if backend == "reference" or route == "dense":
        with _autocast_off(autocast_device):
            y, idx, gates, bal, z = reference.sparse_ffn_ref(
                t["x"], t["keys"], t["values"], block_size=block_size, top_k=top_k,
                key_bias=t["key_bias"], out_bias=t["out_bias"], activation=activation,
                selection=selection, router_weight=router_weight, token_ids=token_ids,
                hash_table=hash_table, seed=seed, return_selection=True,
                gate_keys=t["gate_keys"], gate_bias=t["gate_bias"])
        sel = Selection(idx, gates, bw * bal + zw * z, bal, z)
        return (y, sel) if return_selection else y
    be = ops.resolve_backend(backend, x.device, x2d.shape[0], kernel_grad and route is None,
                             x2d.dtype, gated=gated)
    with _autocast_off(autocast_device):
        if route is not None:
            be = "torch"
        kbar = bbar = None
        if selection == "avgk":
            # Means come from the parameters themselves, not the autocast copies; a gated
            # FFN scores the gate table's block means.
            score_keys, score_bias = (gate_keys, gate_bias) if gated else (keys, key_bias)
            kbar, bbar = _means(score_keys, score_bias, block_size, be, means_cache)
        if selection == "avgk" and route is None:  # one fused step where the backend has it
            y2d, idx = ops.avgk_ffn(x2d, kbar, bbar, t["keys"], t["values"], t["key_bias"],
                                    t["out_bias"], top_k, block_size, activation, be,
                                    _deterministic(deterministic), kernel_grad,
                                    t["gate_keys"], t["gate_bias"])
            sel = selection_lib.ungated(idx, x2d)
        else:
            sel = selection_lib.select(
                x2d, selection, top_k=top_k, n_blocks=n_blocks, backend=be, route=route,
                kbar=kbar, bbar=bbar, router_weight=router_weight, token_ids=ids,
                hash_table=hash_table, seed=seed, balance_loss_weight=bw, z_loss_weight=zw)
            if route == "composite":
                y2d = ops.block_ffn_composite(x2d, t["keys"], t["values"], sel.indices,
                                              t["key_bias"], t["out_bias"], sel.gates,
                                              block_size, activation, t["gate_keys"],
                                              t["gate_bias"])
            else:
                y2d, _, _ = ops.block_ffn(x2d, t["keys"], t["values"], sel.indices,
                                          t["key_bias"], t["out_bias"], sel.gates, block_size,
                                          activation, be, _deterministic(deterministic),
                                          kernel_grad, t["gate_keys"], t["gate_bias"])
    if flat:
        return (y2d, sel) if return_selection else y2d
    y = y2d.reshape(lead + (d_model,))
    if not return_selection:
        return y
    gates = None if sel.gates is None else sel.gates.reshape(lead + (top_k,))
    return y, sel._replace(indices=sel.indices.reshape(lead + (top_k,)), gates=gates)
