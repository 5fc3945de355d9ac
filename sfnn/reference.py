"""The dense-masked reference: obvious, slow, and the oracle of every test.

Every cell of the FFN is computed and the cells of unselected blocks are masked out, so the
result is right by construction; autograd supplies the gradients. Never a fast path.
"""
from __future__ import annotations

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
) -> torch.Tensor:
    """The block FFN over given block indices, dense-masked.

    ``y_t = sum_j gate[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i + out_bias``
    (a block chosen in two slots counts twice; without gates every gate is 1).

    x: (T, d_model); keys, values: (d_ff, d_model); indices: (T, top_k) integer;
    key_bias: (d_ff,); out_bias: (d_model,); gates: (T, top_k). Returns (T, d_model) in x's dtype.
    """
    d_ff = keys.shape[0]
    pre = x @ keys.t()  # [T, d_ff]
    if key_bias is not None:
        pre = pre + key_bias
    weight = block_weights_ref(indices, d_ff // block_size, gates, pre.dtype)
    weight = weight.repeat_interleave(block_size, dim=1)  # [T, d_ff]
    # Selection comes from the indices alone, so a gate of exactly 0 still passes its gradient.
    chosen = block_weights_ref(indices, d_ff // block_size, None, torch.float32)
    selected = chosen.repeat_interleave(block_size, dim=1) > 0
    # where(), not a product: an unselected cell of a NaN token must stay out of every sum.
    h = torch.where(selected, apply_activation(pre, activation) * weight, torch.zeros_like(pre))
    y = h @ values
    if out_bias is not None:
        y = y + out_bias
    return y


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
) -> torch.Tensor:
    """Avg-K selection followed by the dense-masked block FFN. x: (..., d_model) -> same shape."""
    x2d = x.reshape(-1, x.shape[-1])
    kbar, bbar = block_means_ref(keys, key_bias, block_size)
    indices = select_blocks_ref(x2d, kbar, bbar, top_k)
    y = block_ffn_ref(
        x2d, keys, values, indices, block_size=block_size, key_bias=key_bias,
        out_bias=out_bias, activation=activation,
    )
    return y.reshape(x.shape)
