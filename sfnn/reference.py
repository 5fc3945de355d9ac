"""The dense-masked reference: obvious, slow, and the oracle of every test.

Every cell of the FFN is computed and the cells of unselected blocks are masked out, so the
result is right by construction; autograd supplies the gradients. Never a fast path.

Every selection method of :mod:`sfnn.selection` has its oracle here (:func:`select_ref`), written
independently of the fast code: router top-k by a stable sort, the balancing loss from dense
one-hot masks, the random draws in numpy's wrapping uint32 arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

from ._activations import apply_activation


def block_means_ref(
    keys: torch.Tensor, key_bias: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean key and mean key bias of every block, in float32 (float64 for float64 keys).

    keys: (d_ff, d_model); key_bias: (d_ff,) or None.
    Returns kbar: (n_blocks, d_model) and bbar: (n_blocks,) or None.
    """
    d_ff, d_model = keys.shape
    dtype = _score_dtype(keys.dtype)
    kbar = keys.detach().to(dtype).reshape(d_ff // block_size, block_size, d_model).mean(1)
    bbar = None
    if key_bias is not None:
        bbar = key_bias.detach().to(dtype).reshape(d_ff // block_size, block_size).mean(1)
    return kbar, bbar


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_scores_ref(
    x: torch.Tensor, kbar: torch.Tensor, bbar: torch.Tensor | None
) -> torch.Tensor:
    """Avg-K scores ``x . kbar_b + bbar_b`` in float32 (float64 for float64 x).
    x: (T, d_model) -> (T, n_blocks)."""
    dtype = _score_dtype(x.dtype)
    scores = x.detach().to(dtype) @ kbar.detach().to(dtype).t()
    if bbar is not None:
        scores = scores + bbar.detach().to(dtype)
    return scores


def select_blocks_ref(
    x: torch.Tensor, kbar: torch.Tensor, bbar: torch.Tensor | None, top_k: int
) -> torch.Tensor:
    """The ``top_k`` blocks of largest score per token, best first; ties to the smaller index.

    x: (T, d_model). Returns (T, top_k) int32 block indices.
    """
    scores = block_scores_ref(x, kbar, bbar)
    # A stable descending sort keeps equal scores in ascending index order.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :top_k].to(torch.int32)


def block_weights_ref(
    indices: torch.Tensor, n_blocks: int, gates: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """(T, n_blocks) weight of every block for every token: the sum over the token's slots
    that chose the block of the slot's gate (1 without gates). Differentiable in ``gates``."""
    # A comparison, not F.one_hot: it batches under torch.func.vmap.
    blocks = torch.arange(n_blocks, device=indices.device)
    one_hot = (indices.long().unsqueeze(-1) == blocks).to(dtype)  # [T, k, nb]
    if gates is None:
        return one_hot.sum(1)
    return (one_hot * gates.to(dtype).unsqueeze(-1)).sum(1)


def block_ffn_ref(
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_size: int,
    key_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    activation: str = "relu",
    gate_keys: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The block FFN over given block indices, dense-masked.

    ``y_t = sum_j gate[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i + out_bias``
    (a block chosen in two slots counts twice; without gates every gate is 1). With
    ``gate_keys`` the gated FFN: ``act(x_t . k_i + b_i)`` becomes
    ``act(x_t . kg_i + bg_i) * (x_t . k_i + b_i)`` (``keys``/``key_bias`` the up table).

    x: (T, d_model); keys, values, gate_keys: (d_ff, d_model); indices: (T, top_k) integer;
    key_bias, gate_bias: (d_ff,); out_bias: (d_model,); gates: (T, top_k). Returns (T, d_model)
    in x's dtype.
    """
    d_ff = keys.shape[0]
    pre = x @ keys.t()  # [T, d_ff]
    if key_bias is not None:
        pre = pre + key_bias
    if gate_keys is not None:
        pre_gate = x @ gate_keys.t()
        if gate_bias is not None:
            pre_gate = pre_gate + gate_bias
        cell = apply_activation(pre_gate, activation) * pre
    else:
        cell = apply_activation(pre, activation)
    weight = block_weights_ref(indices, d_ff // block_size, gates, pre.dtype)
    weight = weight.repeat_interleave(block_size, dim=1)  # [T, d_ff]
    # Selection comes from the indices alone, so a gate of exactly 0 still passes its gradient.
    chosen = block_weights_ref(indices, d_ff // block_size, None, torch.float32)
    selected = chosen.repeat_interleave(block_size, dim=1) > 0
    # where(), not a product: an unselected cell of a NaN token must stay out of every sum.
    h = torch.where(selected, cell * weight, torch.zeros_like(pre))
    y = h @ values
    if out_bias is not None:
        y = y + out_bias
    return y


def dense_gated_ffn_ref(
    x: torch.Tensor,
    gate_keys: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    gate_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """The dense gated FFN, ``down(act(gate(x)) * up(x))``, written out with no selection: the
    oracle a gated layer with ``top_k == n_blocks`` must equal.

    x: (..., d_model); gate_keys, keys (the up table), values: (d_ff, d_model) (gate_proj.weight,
    up_proj.weight, down_proj.weight.T); biases (d_ff,), (d_ff,), (d_model,) or None."""
    a_g = x @ gate_keys.t()
    if gate_bias is not None:
        a_g = a_g + gate_bias
    a_u = x @ keys.t()
    if key_bias is not None:
        a_u = a_u + key_bias
    y = (apply_activation(a_g, activation) * a_u) @ values
    return y if out_bias is None else y + out_bias


def router_logits_ref(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """(T, n_blocks) router logits in float32 (float64 for float64 x), differentiable."""
    dtype = _score_dtype(x.dtype)
    return x.to(dtype) @ router_weight.to(dtype).t()


def topk_ref(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """int32 (T, top_k): columns of the largest scores, best first, ties to the smaller one."""
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices
    return order[:, :top_k].to(torch.int32)


def balance_loss_ref(probs: torch.Tensor, indices: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """``n_blocks * sum_b f_b P_b``: f_b the share of the (token, slot) assignments that chose b
    (a dense one-hot count), P_b the mean router probability of b. probs: (T, n_blocks)."""
    T, top_k = indices.shape
    if T == 0:
        return probs.sum() * 0
    chosen = block_weights_ref(indices, n_blocks, None, probs.dtype)  # [T, n_blocks]
    f = chosen.sum(0) / (T * top_k)
    return n_blocks * (f * probs.mean(0)).sum()


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 in numpy uint32, whose multiplication wraps modulo 2**32."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def random_blocks_ref(n_tokens: int, n_blocks: int, top_k: int, seed) -> torch.Tensor:
    """int32 (n_tokens, top_k): the ``random`` method's draws (see
    :func:`sfnn.selection.random_blocks`), computed in numpy uint32 arithmetic. seed: an int or
    an int64 () tensor."""
    seed = int(seed) & (2**64 - 1)
    lo, hi = np.array([seed & 0xFFFFFFFF], np.uint32), np.array([seed >> 32], np.uint32)
    h0 = _mix32_np(_mix32_np(lo ^ np.uint32(0x243F6A88)) ^ hi)
    t = np.arange(n_tokens, dtype=np.uint64)
    t_lo, t_hi = (t & np.uint64(0xFFFFFFFF)).astype(np.uint32), (t >> np.uint64(32))
    ht = _mix32_np(_mix32_np(h0 ^ t_lo) ^ t_hi.astype(np.uint32))
    hb = _mix32_np(np.arange(n_blocks, dtype=np.uint32) ^ np.uint32(0x9E3779B9))
    key = _mix32_np(ht[:, None] ^ hb[None, :]) >> np.uint32(1)  # 31 bits
    # Largest key first; among equal keys the smaller block (a stable sort of -key).
    order = np.argsort(-key.astype(np.int64), axis=1, kind="stable")[:, :top_k]
    return torch.from_numpy(order.astype(np.int32))


def select_ref(
    x: torch.Tensor,
    selection: str,
    *,
    top_k: int,
    n_blocks: int,
    keys: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    block_size: int | None = None,
    router_weight: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    seed=None,
):
    """The oracle of every selection method: ``(indices (T, top_k) int32, gates (T, top_k) or
    None, balance_loss (), z_loss ())``.

    x: (T, d_model). avgk: keys (d_ff, d_model), key_bias, block_size. switch/moe:
    router_weight (n_blocks, d_model); gates and losses are differentiable in x and the router.
    hash: token_ids (T,), hash_table (vocab, top_k). random: seed (int or int64 () tensor).
    """
    zero = torch.zeros((), dtype=_score_dtype(x.dtype), device=x.device)
    if selection == "avgk":
        kbar, bbar = block_means_ref(keys, key_bias, block_size)
        return select_blocks_ref(x, kbar, bbar, top_k), None, zero, zero
    if selection == "hash":
        return hash_table[token_ids.long()].to(torch.int32), None, zero, zero
    if selection == "random":
        return random_blocks_ref(x.shape[0], n_blocks, top_k, seed).to(x.device), None, zero, zero
    if selection not in ("switch", "moe"):
        raise ValueError(f"unknown selection {selection!r}")
    logits = router_logits_ref(x, router_weight)
    indices = topk_ref(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    chosen = logits.gather(1, indices.long())
    if selection == "switch":
        gates = probs.gather(1, indices.long())
    else:
        gates = torch.softmax(chosen, dim=-1)
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean() if x.shape[0] else zero
    return indices, gates, balance_loss_ref(probs, indices, n_blocks), z


def sparse_ffn_ref(
    x: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    key_bias: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    activation: str = "relu",
    selection: str = "avgk",
    router_weight: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hash_table: torch.Tensor | None = None,
    seed=None,
    return_selection: bool = False,
    gate_keys: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
):
    """Selection (Avg-K by default, or any method of :func:`select_ref`) followed by the
    dense-masked block FFN with the method's gates. x: (..., d_model) -> same shape; token_ids:
    x's leading shape (hash). With ``gate_keys`` (and ``gate_bias``) the gated FFN, whose Avg-K
    scores the gate table's block means.

    With ``return_selection``: ``(y, indices (..., top_k), gates (..., top_k) or None,
    balance_loss, z_loss)``.
    """
    x2d = x.reshape(-1, x.shape[-1])
    ids = None if token_ids is None else token_ids.reshape(-1)
    indices, gates, bal, z = select_ref(
        x2d, selection, top_k=top_k, n_blocks=keys.shape[0] // block_size,
        keys=keys if gate_keys is None else gate_keys,
        key_bias=key_bias if gate_keys is None else gate_bias, block_size=block_size,
        router_weight=router_weight, token_ids=ids, hash_table=hash_table, seed=seed,
    )
    y = block_ffn_ref(
        x2d, keys, values, indices, block_size=block_size, key_bias=key_bias,
        out_bias=out_bias, gates=gates, activation=activation, gate_keys=gate_keys,
        gate_bias=gate_bias,
    ).reshape(x.shape)
    if not return_selection:
        return y
    lead = x.shape[:-1] + (top_k,)
    return y, indices.reshape(lead), None if gates is None else gates.reshape(lead), bal, z
