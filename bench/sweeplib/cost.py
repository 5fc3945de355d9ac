"""The analytic cost model: FLOPs and fewest bytes of a case (SPEC.md, "What it costs")."""
from __future__ import annotations

from .cases import ELEMENT_SIZE, Case


def cost_model(case: Case, distinct_blocks: int) -> dict:
    """FLOPs and fewest bytes of a case (SPEC.md, "What it costs").

    useful_flops: the sparse GEMM FLOPs only (4*d*top_k*g per token forward, twice that
    backward). floor_flops adds the scoring (2*d*n_blocks per token) and, outside decode, forming
    kbar (one pass over keys: the weights change every training step). floor_bytes (memory):
    x and y once, kbar once, each distinct selected block's key and value rows once, the indices,
    and the fp32 accumulator written and read back once (dx likewise in backward).
    combine_bytes: the combine as the kernels do it, an fp32 read-modify-write (8 bytes) per
    partial element, ``8 * T * top_k * d_model`` (none when top_k == 1), again for dx: at cache
    (L2) bandwidth when the schedule keeps the accumulator's live part in L2 (the L2 floor), at
    memory bandwidth when it does not (the HBM floor). See :func:`floors`.
    A gated case has three tables: 1.5x the GEMM FLOPs (sparse and dense) and the gate rows'
    bytes too.
    """
    T, d, g, k = case.tokens, case.d_model, case.block_size, case.top_k
    es = ELEMENT_SIZE[case.dtype]
    nb = case.n_blocks
    block_rows = distinct_blocks * g
    tables = 3 if case.gated else 2  # key tables + the value table
    gemm_fwd = 2 * tables * T * d * k * g
    scoring = 2 * T * d * nb
    kbar_flops = case.d_ff * d
    combine = 8 * T * k * d if k > 1 else 0
    acc = 2 * T * d * 4 if k > 1 else 0
    fwd_bytes = 2 * T * d * es + nb * (d + 1) * 4 + tables * block_rows * d * es \
        + (tables - 1) * block_rows * es + acc + 2 * T * k * 4
    bwd_bytes = 3 * T * d * es + 2 * tables * block_rows * d * es \
        + 2 * (tables - 1) * block_rows * es + acc \
        + T * k * 4
    kbar_bytes = case.d_ff * (d + 1) * es
    n_combines = 1
    if case.mode == "forward":
        useful, flops, nbytes = gemm_fwd, gemm_fwd + scoring + kbar_flops, fwd_bytes + kbar_bytes
    elif case.mode == "backward":
        useful, flops, nbytes = 2 * gemm_fwd, 2 * gemm_fwd, bwd_bytes
    elif case.mode == "forward+backward":
        useful = 3 * gemm_fwd
        flops = useful + scoring + kbar_flops
        nbytes = fwd_bytes + kbar_bytes + bwd_bytes
        n_combines = 2
    else:  # decode: kbar cached
        useful, flops, nbytes = gemm_fwd, gemm_fwd + scoring, fwd_bytes
    dense_fwd = 2 * tables * T * d * case.d_ff
    dense = {"forward": dense_fwd, "backward": 2 * dense_fwd, "forward+backward": 3 * dense_fwd,
             "decode": dense_fwd}[case.mode]
    return {"useful_flops": useful, "floor_flops": flops, "floor_bytes": nbytes,
            "combine_bytes": n_combines * combine, "dense_flops": dense}


def floors(costs: dict, tflops: float, gbs: float, cache_gbs: float) -> tuple[float, float]:
    """(L2 floor, HBM floor) in seconds: ``max(FLOPs / peak, bytes / bandwidth)`` with the
    combine's read-modify-writes at cache bandwidth, or at memory bandwidth."""
    compute = costs["floor_flops"] / (tflops * 1e12)
    memory = costs["floor_bytes"] / (gbs * 1e9)
    l2 = max(compute, memory, costs["combine_bytes"] / (cache_gbs * 1e9))
    hbm = max(compute, (costs["floor_bytes"] + costs["combine_bytes"]) / (gbs * 1e9))
    return l2, hbm

