"""Mean key and mean key bias of every block (Avg-K's ``kbar``/``bbar``) in one pass over keys.

``kbar[b] = mean(keys[b*g:(b+1)*g])`` and ``bbar[b] = mean(key_bias[b*g:(b+1)*g])``, accumulated
in float32 whatever the input dtype. One program owns one block and a ``BLOCK_D`` slice of
``d_model`` and walks the block's ``g`` rows ``BLOCK_G`` at a time; the program with the first
slice also averages the block's key biases. Each element of ``keys`` is read exactly once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import autotune, on_tensor_device


def _prune_block_means(configs, named_args, **kwargs):
    """Drop configs whose tiles are far larger than the problem (they only waste lanes)."""
    g = named_args["block_size"]
    d = named_args["d_model"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_G"] <= max(8, triton.next_power_of_2(g))
        and c.kwargs["BLOCK_D"] <= max(32, triton.next_power_of_2(d))
    ]
    return kept or configs[:1]


@autotune(_configs.block_means_configs(), ints=("block_size", "d_model"),
          prune=_prune_block_means)
@triton.jit
def _block_means_kernel(
    keys_ptr,
    key_bias_ptr,
    kbar_ptr,
    bbar_ptr,
    d_model,
    block_size,
    stride_keys_f,
    stride_kbar_b,
    HAS_BIAS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_d = o_d < d_model
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for g0 in range(0, block_size, BLOCK_G):
        o_g = g0 + tl.arange(0, BLOCK_G)  # [BLOCK_G]
        m_g = o_g < block_size
        o_row = i_b * block_size + o_g  # int64
        p_k = keys_ptr + o_row[:, None] * stride_keys_f + o_d[None, :]  # [BLOCK_G, BLOCK_D]
        b_k = tl.load(p_k, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_acc += tl.sum(b_k, axis=0)
    tl.store(kbar_ptr + i_b * stride_kbar_b + o_d, b_acc / block_size, mask=m_d)
    if HAS_BIAS:
        if i_d == 0:
            b_bacc = tl.zeros([BLOCK_G], dtype=tl.float32)
            for g0 in range(0, block_size, BLOCK_G):
                o_g = g0 + tl.arange(0, BLOCK_G)
                m_g = o_g < block_size
                b_bias = tl.load(key_bias_ptr + i_b * block_size + o_g, mask=m_g, other=0.0)
                b_bacc += b_bias.to(tl.float32)
            tl.store(bbar_ptr + i_b, tl.sum(b_bacc, axis=0) / block_size)


@on_tensor_device
def block_means(
    keys: torch.Tensor, key_bias: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kbar float32 (n_blocks, d_model) and bbar float32 (n_blocks,) or None.

    keys: (d_ff, d_model) contiguous, fp32/fp16/bf16; key_bias: (d_ff,) contiguous or None;
    ``block_size`` divides ``d_ff``.

    Example::

        kbar, bbar = block_means(fc1.weight, fc1.bias, 64)
    """
    d_ff, d_model = keys.shape
    # The op layer validated the inputs; these only guard misuse.
    assert keys.is_contiguous() and block_size > 0 and d_ff % block_size == 0, block_size
    assert key_bias is None or key_bias.shape == (d_ff,), key_bias.shape
    key_bias = None if key_bias is None else key_bias.contiguous()
    n_blocks = d_ff // block_size
    kbar = torch.empty((n_blocks, d_model), device=keys.device, dtype=torch.float32)
    bbar = None
    if key_bias is not None:
        bbar = torch.empty((n_blocks,), device=keys.device, dtype=torch.float32)
    if n_blocks == 0 or d_model == 0:
        if bbar is not None:
            bbar.zero_()
        return kbar, bbar

    def grid(meta):
        return (n_blocks, triton.cdiv(d_model, meta["BLOCK_D"]))

    _block_means_kernel[grid](
        keys,
        key_bias if key_bias is not None else kbar,
        kbar,
        bbar if bbar is not None else kbar,
        d_model,
        block_size,
        keys.stride(0),
        kbar.stride(0),
        HAS_BIAS=key_bias is not None,
    )
    return kbar, bbar
