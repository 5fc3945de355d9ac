"""The pure-PyTorch backend: the CPU path, and the fallback wherever Triton cannot run.

Block-grouped and honest with memory: the (token, slot) pairs are sorted by block (indices only),
each block's tokens are gathered and computed with two dense GEMMs over the block's g rows, and the
results are scattered back. The (tokens, d_ff) activation and per-token weight copies are never
formed; the forward keeps only the selected cells' pre-activations, (tokens * top_k, g), for the
backward, which is written by hand and reuses the same grouping.

Functions follow the backend protocol of :mod:`sfnn.ops`: inputs are validated and contiguous,
``indices`` is int32 (T, top_k) with T >= 1, ``gates`` is float32 (T, top_k) or None.
"""
from __future__ import annotations

import torch

from ._activations import activation_grad, apply_activation

Tensor = torch.Tensor


def block_means(keys: Tensor, key_bias: Tensor | None, block_size: int):
    """kbar (n_blocks, d_model) and bbar (n_blocks,) in float32 (float64 for float64 keys)."""
    d_ff, d_model = keys.shape
    n_blocks = d_ff // block_size
    acc = _acc_dtype(keys.dtype)
    kbar = keys.reshape(n_blocks, block_size, d_model).mean(1, dtype=acc)
    bbar = None
    if key_bias is not None:
        bbar = key_bias.reshape(n_blocks, block_size).mean(1, dtype=acc)
    return kbar, bbar


def block_scores(x2d: Tensor, kbar: Tensor, bbar: Tensor | None) -> Tensor:
    """Avg-K scores (T, n_blocks) in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    xs, ks = x2d.to(dtype), kbar.to(dtype)
    if bbar is None:
        return xs @ ks.t()
    return torch.addmm(bbar.to(dtype), xs, ks.t())


def ordered_score_keys(scores: Tensor) -> Tensor:
    """Pack each score and its block index into one int64 whose order is (score, -index).

    The high 32 bits are the float32 score's bits remapped so that signed-integer order equals
    float order; the low 32 bits are ``n_blocks - 1 - index``, so among equal scores the smaller
    block index wins. One top-k over these keys is the selection, ties included, and every key
    is distinct, so even a NaN score yields valid, distinct indices. (The Triton kernel uses the
    same packing.)
    """
    n_blocks = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    index = torch.arange(n_blocks, device=scores.device, dtype=torch.int64)
    return (bits.to(torch.int64) << 32) | (n_blocks - 1 - index)


def select_blocks(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int) -> Tensor:
    """The top_k blocks of largest score per token, best first, ties to the smaller index.

    x2d: (T, d_model); kbar: (n_blocks, d_model) float32. Returns int32 (T, top_k). float64
    inputs are ranked by their float64 scores (a stable sort: the packed keys hold float32).
    """
    n_blocks = kbar.shape[0]
    scores = block_scores(x2d, kbar, bbar)
    if scores.dtype == torch.float64:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[:, :top_k].to(torch.int32)
    keys = ordered_score_keys(scores)
    best = torch.topk(keys, top_k, dim=-1, sorted=True).values
    return (n_blocks - 1 - (best & 0xFFFFFFFF)).to(torch.int32)


class _Routing:
    """The (token, slot) pairs grouped by block: pair ``p = t * top_k + j`` in block order."""

    def __init__(self, indices: Tensor, n_blocks: int):
        T, top_k = indices.shape
        flat = indices.reshape(-1).long()
        counts = torch.bincount(flat, minlength=n_blocks)
        if counts.numel() != n_blocks or (flat.numel() and int(flat.min()) < 0):
            raise ValueError(f"indices must lie in [0, {n_blocks}); got values outside it")
        self.pairs = torch.argsort(flat, stable=True)  # [T * top_k], int64
        self.tokens = self.pairs // top_k
        ends = counts.cumsum(0).tolist()  # the CPU path loops over blocks on the host anyway
        starts = [0] + ends[:-1]
        spans = enumerate(zip(starts, ends, strict=True))
        self.spans = [(b, s, e) for b, (s, e) in spans if e > s]


def route_numel(T: int, top_k: int, n_blocks: int, deterministic: bool) -> int:
    """The torch path keeps no routing for the backward (it sorts again: one argsort)."""
    return 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_ffn_fwd(
    x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None, *,
    block_size: int, activation: str, save_for_backward: bool, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y (T, d_model) in x's dtype, the selected pre-activations (T*top_k, g) in block order
    when ``save_for_backward`` (else an empty tensor), and an empty route (see
    :func:`route_numel`). Deterministic always (CPU index_add_)."""
    del deterministic  # sequential scatter on the host: always bitwise repeatable
    T, d_model = x2d.shape
    g = block_size
    routing = _Routing(indices, keys.shape[0] // g)
    acc = _acc_dtype(x2d.dtype)
    y = torch.zeros(T, d_model, dtype=acc, device=x2d.device)
    if out_bias is not None:
        y += out_bias
    saved = x2d.new_empty(routing.pairs.numel(), g) if save_for_backward else x2d.new_empty(0)
    pair_gates = None if gates is None else gates.reshape(-1)[routing.pairs]
    for b, s, e in routing.spans:
        rows = slice(b * g, (b + 1) * g)
        tok = routing.tokens[s:e]
        xb = x2d.index_select(0, tok)  # [n, d_model]
        if key_bias is not None:
            pre = torch.addmm(key_bias[rows], xb, keys[rows].t())  # [n, g]
        else:
            pre = xb @ keys[rows].t()
        if save_for_backward:
            saved[s:e] = pre
        h = apply_activation(pre, activation)
        if pair_gates is not None:
            h = h * pair_gates[s:e, None].to(h.dtype)
        y.index_add_(0, tok, (h @ values[rows]).to(acc))
    return y.to(x2d.dtype), saved, indices.new_empty(0)


def block_ffn_bwd(
    dy: Tensor, x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, gates: Tensor | None, saved: Tensor, route: Tensor, *,
    block_size: int, activation: str, deterministic: bool, needs: tuple[bool, ...],
):
    """(dx, dkeys, dvalues, dkey_bias, dgates float32), each None when ``needs`` (one flag per
    output) leaves it out; pre-activations come from ``saved`` when the forward kept them, else
    they are recomputed. Only the GEMMs of the needed gradients run."""
    del deterministic, route
    need_dx, need_dk, need_dv, need_dkb, need_dg = needs
    need_da = need_dx or need_dk or need_dkb
    T, d_model = x2d.shape
    g = block_size
    routing = _Routing(indices, keys.shape[0] // g)
    acc = _acc_dtype(x2d.dtype)
    dx = torch.zeros(T, d_model, dtype=acc, device=x2d.device) if need_dx else None
    dkeys = torch.zeros_like(keys) if need_dk else None
    dvalues = torch.zeros_like(values) if need_dv else None
    dkey_bias = torch.zeros_like(key_bias) if need_dkb else None
    dgates_pairs = None
    if need_dg:
        dgates_pairs = torch.zeros(routing.pairs.numel(), dtype=acc, device=x2d.device)
    pair_gates = None if gates is None else gates.reshape(-1)[routing.pairs]
    for b, s, e in routing.spans:
        rows = slice(b * g, (b + 1) * g)
        tok = routing.tokens[s:e]
        dyb = dy.index_select(0, tok)  # [n, d_model]
        xb = x2d.index_select(0, tok) if (need_dk or not saved.numel()) else None  # [n, d_model]
        if saved.numel():
            pre = saved[s:e]
        elif key_bias is not None:
            pre = torch.addmm(key_bias[rows], xb, keys[rows].t())
        else:
            pre = xb @ keys[rows].t()
        h = apply_activation(pre, activation) if (need_dv or need_dg) else None  # [n, g]
        dh = dyb @ values[rows].t() if (need_da or need_dg) else None  # [n, g], before the gate
        if pair_gates is not None:
            gate = pair_gates[s:e, None].to(pre.dtype)
            if need_dg:
                dgates_pairs[s:e] = (h * dh).sum(1, dtype=acc)
            h = None if h is None else h * gate
            dh = None if dh is None else dh * gate
        if need_dv:
            dvalues[rows] = h.t() @ dyb
        if not need_da:
            continue
        da = dh * activation_grad(pre, activation)
        if need_dk:
            dkeys[rows] = da.t() @ xb
        if need_dkb:
            dkey_bias[rows] = da.sum(0, dtype=acc)
        if need_dx:
            dx.index_add_(0, tok, (da @ keys[rows]).to(acc))
    dgates = None
    if dgates_pairs is not None:
        dgates = torch.empty_like(dgates_pairs)
        dgates[routing.pairs] = dgates_pairs
        dgates = dgates.view(T, -1)
    return (None if dx is None else dx.to(x2d.dtype)), dkeys, dvalues, dkey_bias, dgates
