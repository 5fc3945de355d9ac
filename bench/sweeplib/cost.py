"""The analytic cost model: FLOPs and fewest bytes of a case (SPEC.md, "What it costs")."""
from __future__ import annotations

from .cases import ELEMENT_SIZE, Case


def cost_model(case: Case, distinct_blocks: int) -> dict:
    """FLOPs and fewest bytes of a case (SPEC.md, "What it costs").

    useful_flops: the sparse GEMM FLOPs only (4*d*top_k*g per token forward, twice that
    backward). floor_flops adds the scoring (2*d*n_blocks per token) and, outside decode, forming
    kbar (one pass over keys: the weights change every training step). floor_bytes: x and y once,
    kbar once, each distinct selected block's key and value rows once, the indices, and the
    combine: top_k partial outputs per token written and read back (dx likewise in backward).
    """
    T, d, g, k = case.tokens, case.d_model, case.block_size, case.top_k
    es = ELEMENT_SIZE[case.dtype]
    nb = case.n_blocks
    block_rows = distinct_blocks * g
    gemm_fwd = 4 * T * d * k * g
    scoring = 2 * T * d * nb
    kbar_flops = case.d_ff * d
    combine = 2 * T * k * d * es
    fwd_bytes = 2 * T * d * es + nb * (d + 1) * 4 + 2 * block_rows * d * es + block_rows * es \
        + combine + 2 * T * k * 4
    bwd_bytes = 3 * T * d * es + 4 * block_rows * d * es + 2 * block_rows * es + combine \
        + T * k * 4
    kbar_bytes = case.d_ff * (d + 1) * es
    if case.mode == "forward":
        useful, flops, nbytes = gemm_fwd, gemm_fwd + scoring + kbar_flops, fwd_bytes + kbar_bytes
    elif case.mode == "backward":
        useful, flops, nbytes = 2 * gemm_fwd, 2 * gemm_fwd, bwd_bytes
    elif case.mode == "forward+backward":
        useful = 3 * gemm_fwd
        flops = useful + scoring + kbar_flops
        nbytes = fwd_bytes + kbar_bytes + bwd_bytes
    else:  # decode: kbar cached
        useful, flops, nbytes = gemm_fwd, gemm_fwd + scoring, fwd_bytes
    dense_fwd = 4 * T * d * case.d_ff
    dense = {"forward": dense_fwd, "backward": 2 * dense_fwd, "forward+backward": 3 * dense_fwd,
             "decode": dense_fwd}[case.mode]
    return {"useful_flops": useful, "floor_flops": flops, "floor_bytes": nbytes,
            "dense_flops": dense}

