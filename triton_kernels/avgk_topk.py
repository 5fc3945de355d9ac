"""Fused Avg-K scoring and top-K block selection.

``s[t, b] = x_t . kbar_b + bbar_b``; per token keep the ``top_k`` largest, best first, ties to the
smaller block index. One program owns a tile of ``BLOCK_T`` tokens and walks the ``n_blocks`` mean
keys ``BLOCK_N`` at a time: a ``[BLOCK_T, BLOCK_N]`` score tile (``tl.dot`` over ``d_model`` in
``BLOCK_D`` chunks, fp32 accumulation) is merged into a running top-K held in registers, so the
``(T, n_blocks)`` score matrix never reaches memory.

Selection key: each fp32 score is mapped to an int32 whose signed order is the float order
(negative floats get their magnitude bits flipped; -0.0 is folded into +0.0 first), and packed with
the inverted block index into one int64, ``(ord(s) << 32) | (2**31 - 1 - b)``. Keys are distinct
within a token, larger key = larger score and, on a tie, smaller index, so a bitonic top-K of the
keys alone carries the indices. A chunk's top ``K_PAD`` keys (a bitonic top-k, the network of
``tl.topk``, written here with a sum-based partner exchange so the interpreter runs it fast) come
out ascending; ``max(best, chunk_top)`` against the descending running list is a bitonic sequence
holding the ``K_PAD`` largest of both, and one bitonic merge sorts it again. ``K_PAD`` is ``top_k``
rounded up to a power of two (at least 2); only the first ``top_k`` are stored. A NaN score maps
to a key like any other bits, so a token whose ``x`` has a NaN still gets ``top_k`` distinct
indices in ``[0, n_blocks)``, and tokens never mix.

Precision: scores are fp32 accumulations. fp32 ``x`` is dotted with fp32 ``kbar`` at
:func:`dot_precision` (true fp32 under ``torch.get_float32_matmul_precision() == "highest"``, tf32
otherwise). For 16-bit ``x`` (exact in its own dtype) ``kbar`` is split in registers into
``hi = kbar.to(x.dtype)`` and ``lo = (kbar - hi).to(x.dtype)`` and both are dotted on the tensor
cores: ``x.hi + x.lo`` carries ~16 (bf16) mantissa bits of ``kbar`` instead of 8, so the selection
agrees with the fp32 reference except on true near-ties, at twice the tensor-core work of a plain
16-bit dot and far less than an fp32 (FMA) dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from . import _configs
from ._common import INTERPRET, autotune, dot, dot_precision, on_tensor_device

# Largest top_k the kernel accepts: the largest K_PAD any config holds.
MAX_TOP_K = _configs.TOPK_MAX_K_PAD

_KEY_MIN = tl.constexpr(-(2**63))


def k_pad(top_k: int) -> int:
    return max(2, triton.next_power_of_2(top_k))


def d_split(dtype, precision: str) -> int:
    """How finely a BLOCK_D chunk is split for fp32 x (see the kernel's D_STEP)."""
    return {"16bit": 1, "tf32": 2, "ieee": 4}[_configs.topk_dot_kind(dtype, precision)]


@constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@constexpr_function
def _d_step(block_d, d_split):
    return max(16, block_d // d_split)


@triton.jit
def _indicator(N_DIMS: tl.constexpr, j: tl.constexpr):
    """0/1 position along the j-th innermost axis of a [2] * N_DIMS hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(h, flip, i: tl.constexpr):
    """One bitonic compare-and-swap along the i-th innermost axis of the hypercube ``h``.

    The partner of each element is the pair's sum minus itself (int64 arithmetic wraps, so this
    is exact); Triton's own sort uses an xor reduction, which its interpreter runs one element
    at a time in Python, while ``tl.sum`` is one numpy call. Compiled, both fold to the partner.
    """
    N_DIMS: tl.constexpr = _log2(h.numel)
    b_y = tl.sum(h, axis=N_DIMS - 1 - i, keep_dims=True) - h
    is_right = _indicator(N_DIMS, i)
    return tl.where((h > b_y) != (flip ^ is_right).to(tl.int1), b_y, h)


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """Merge bitonic runs of 2**stage into sorted runs: order 0 ascending, 1 descending,
    2 alternating (run r ascending when r is even)."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_and_swap(h, flip, stage - 1 - i)
    return h


@triton.jit
def _topk_rows(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """The K largest keys of each row of ``x`` [R, N] -> [R, K], sorted in the given order.

    Bitonic top-k (as tl.topk): sort runs of K, then repeatedly keep the elementwise max of
    neighbouring runs (one ascending, one descending, so the max is a bitonic run holding the
    larger K) and re-sort; the last merge uses the requested order.
    """
    LOG_N: tl.constexpr = _log2(x.shape[1])
    LOG_K: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_stage(h, i, 2 if i < LOG_N else DESCENDING)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=_log2(h.numel) - 1 - LOG_K)
        h = _bitonic_stage(h, LOG_K, 2 if i < LOG_N else DESCENDING)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _merge_rows_desc(x):
    """Sort each bitonic row of ``x`` [R, K] in descending order."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _bitonic_stage(h, _log2(x.shape[1]), 1)
    return tl.reshape(h, x.shape)


_INTERPRET_HEURISTICS = {"BLOCK_N": lambda args: max(16, args["K_PAD"])} if INTERPRET else {}


def _prune(configs, named_args, **kwargs):
    """Keep the configs that hold this K_PAD for this dot kind (:func:`_configs.topk_keeps`)."""
    k_pad = kwargs["K_PAD"]
    kind = _configs.topk_dot_kind(named_args["x_ptr"].dtype, kwargs["DOT_PRECISION"])
    kept = [c for c in configs if _configs.topk_keeps(c, kind, k_pad)]
    if not kept:
        raise ValueError(f"avgk_topk: no tuning config holds K_PAD={k_pad} (top_k <= {MAX_TOP_K})")
    return kept


@triton.heuristics(_INTERPRET_HEURISTICS)
@autotune(_configs.topk_configs(), ints=("d_model", "n_blocks"), prune=_prune)
@triton.jit(do_not_specialize=["T"])
def _avgk_topk_kernel(
    x_ptr,
    kbar_ptr,
    bbar_ptr,
    idx_ptr,
    score_ptr,
    T,
    d_model,
    n_blocks,
    top_k,
    stride_x_t,
    stride_kbar_b,
    stride_idx_t,
    stride_score_t,
    HAS_BIAS: tl.constexpr,
    RETURN_SCORES: tl.constexpr,
    K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    D_SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # fp32 operands take twice the registers of 16-bit ones (and an FMA "ieee" dot holds both
    # tiles in registers): such configs step through d_model in BLOCK_D // D_SPLIT chunks.
    D_STEP: tl.constexpr = _d_step(BLOCK_D, D_SPLIT)
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] int64
    m_t = o_t < T
    b_best = tl.full([BLOCK_T, K_PAD], _KEY_MIN, dtype=tl.int64)  # sorted, best first
    for n0 in range(0, n_blocks, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < n_blocks
        b_s = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d_model, D_STEP):
            o_d = d0 + tl.arange(0, D_STEP)  # [D_STEP]
            m_d = o_d < d_model
            p_x = x_ptr + o_t[:, None] * stride_x_t + o_d[None, :]  # [BLOCK_T, D_STEP]
            b_x = tl.load(p_x, mask=m_t[:, None] & m_d[None, :], other=0.0)
            p_k = kbar_ptr + o_n[None, :].to(tl.int64) * stride_kbar_b + o_d[:, None]
            b_k = tl.load(p_k, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [D_STEP, BLOCK_N]
            if x_ptr.dtype.element_ty == tl.float32:
                b_s = dot(b_x, b_k, b_s, DOT_PRECISION)
            else:
                b_hi = b_k.to(x_ptr.dtype.element_ty)
                b_lo = (b_k - b_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
                b_s = dot(b_x, b_hi, b_s, DOT_PRECISION)
                b_s = dot(b_x, b_lo, b_s, DOT_PRECISION)
        if HAS_BIAS:
            b_s += tl.load(bbar_ptr + o_n, mask=m_n, other=0.0)[None, :]
        b_s = tl.where(b_s == 0.0, 0.0, b_s)  # -0.0 -> +0.0: equal scores get equal keys
        b_bits = b_s.to(tl.int32, bitcast=True)
        b_ord = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits)  # signed order == float order
        b_key = (b_ord.to(tl.int64) << 32) | (0x7FFFFFFF - o_n).to(tl.int64)[None, :]
        b_key = tl.where(m_n[None, :], b_key, _KEY_MIN)  # [BLOCK_T, BLOCK_N]
        b_top = _topk_rows(b_key, K_PAD, 0)  # [BLOCK_T, K_PAD], ascending
        b_best = tl.maximum(b_best, b_top)  # bitonic, holds the K_PAD best of both lists
        b_best = _merge_rows_desc(b_best)
    o_k = tl.arange(0, K_PAD)
    m_out = m_t[:, None] & (o_k[None, :] < top_k)
    b_idx = 0x7FFFFFFF - (b_best & 0x7FFFFFFF).to(tl.int32)  # undo the inverted index
    tl.store(idx_ptr + o_t[:, None] * stride_idx_t + o_k[None, :], b_idx, mask=m_out)
    if RETURN_SCORES:
        b_ord = (b_best >> 32).to(tl.int32)
        b_bits = tl.where(b_ord < 0, b_ord ^ 0x7FFFFFFF, b_ord)
        b_score = b_bits.to(tl.float32, bitcast=True)
        tl.store(score_ptr + o_t[:, None] * stride_score_t + o_k[None, :], b_score, mask=m_out)


@on_tensor_device
def avgk_topk(
    x2d: torch.Tensor,
    kbar: torch.Tensor,
    bbar: torch.Tensor | None,
    top_k: int,
    return_scores: bool = False,
):
    """Top-``top_k`` Avg-K blocks per token, best first; ties to the smaller block index.

    x2d: (T, d_model) contiguous fp32/fp16/bf16; kbar: (n_blocks, d_model) contiguous float32;
    bbar: (n_blocks,) float32 or None; 1 <= top_k <= n_blocks (the op layer validates), and
    top_k <= MAX_TOP_K (else ValueError).
    Returns int32 (T, top_k) indices, and float32 (T, top_k) scores when ``return_scores``.

    Example::

        kbar, bbar = block_means(keys, key_bias, 64)
        idx = avgk_topk(x.view(-1, d_model), kbar, bbar, 8)
    """
    # The op layer validated the inputs; these only guard misuse. top_k past MAX_TOP_K is a
    # limit of this kernel, not of the op (sfnn.ops scores those with torch).
    T, d_model = x2d.shape
    n_blocks = kbar.shape[0]
    assert kbar.shape == (n_blocks, d_model) and kbar.dtype == torch.float32, kbar.shape
    assert bbar is None or (bbar.shape == (n_blocks,) and bbar.dtype == torch.float32)
    assert x2d.is_contiguous() and kbar.is_contiguous()
    assert bbar is None or bbar.is_contiguous()
    assert 1 <= top_k <= n_blocks, (top_k, n_blocks)
    if top_k > MAX_TOP_K:
        raise ValueError(f"avgk_topk holds top_k <= {MAX_TOP_K} on chip, got top_k={top_k}")
    indices = torch.empty((T, top_k), device=x2d.device, dtype=torch.int32)
    scores = None
    if return_scores:
        scores = torch.empty((T, top_k), device=x2d.device, dtype=torch.float32)
    if T == 0:
        return (indices, scores) if return_scores else indices

    precision = dot_precision(x2d.dtype)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]),)

    _avgk_topk_kernel[grid](
        x2d, kbar, bbar if bbar is not None else kbar, indices,
        scores if scores is not None else indices,
        T, d_model, n_blocks, top_k,
        x2d.stride(0), kbar.stride(0), indices.stride(0),
        scores.stride(0) if scores is not None else 0,
        HAS_BIAS=bbar is not None, RETURN_SCORES=return_scores, K_PAD=k_pad(top_k),
        DOT_PRECISION=precision, D_SPLIT=d_split(x2d.dtype, precision),
    )
    return (indices, scores) if return_scores else indices
