"""Cost model of the block-FFN kernels on a GPU, phase by phase (pure Python).

Each phase of a training step (scoring, routing, fwd pre-activation, fwd output, dh, dx, dW) is
counted the way the kernels do it: FLOPs, bytes that reach HBM, and bytes that go through L2
(gathers, weight tiles, the combine's fp32 read-modify-writes). Its modelled time is the largest
of ``FLOPs / peak``, ``HBM bytes / HBM bandwidth`` and ``L2 bytes / L2 bandwidth`` plus launch
latency; phases add (no overlap between kernels). It is a floor-style model: GEMMs at the
machine's measured dense peak, no pipeline bubbles, no issue-bound loops. What it is for:
comparing schedules and kernel versions against one another, and choosing the combine schedule
per shape (:func:`choose_schedule`, used by the launchers when not told).

The combine: each (token, slot) pair adds ``d_model`` fp32 partials into the accumulator, an
atomic read-modify-write of 8 bytes per element. In L2 that costs ``8 * T * top_k * d_model /
L2 bandwidth``; where the accumulator's live part does not fit in L2, each add misses with the
probability below and moves 8 bytes of HBM traffic (sector fetched, written back later).

Random gathers (x or dy rows in block-major order, the accumulator's rows in the tile schedule)
hit L2 with probability ``min(1, live L2 / size)`` (an LRU cache under uniform random access);
a miss moves the whole row through HBM, and every array is read from HBM at least once.

Assumptions, until the GPU probe (``bench/gpu_probe.py``) measures them: L2 bandwidth 9 TB/s
(8-10 TB/s is the usual H100/H200 figure) for plain and atomic traffic alike; a live set may fill
``L2_LIVE_FRACTION`` of the L2 PyTorch reports (the rest holds the streams: weight tiles, A, x);
a device sort moves 100 bytes per pair (CUB onesweep: 4 passes of keys and int64 values, read
and written). The H200 figures (790 TFLOP/s bf16, 4.3 TB/s, 60 MB L2, 132 SMs) are the ones
measured on the lent H200 (shared/VERIFYING.md).
"""
from __future__ import annotations

import dataclasses
import math

L2_LIVE_FRACTION = 0.6
SORT_BYTES_PER_PAIR = 100


@dataclasses.dataclass(frozen=True)
class Machine:
    """Ceilings of one GPU: TFLOP/s per dot kind, bandwidths in bytes/s, L2 in bytes."""

    name: str
    tflops_16bit: float
    tflops_tf32: float
    tflops_fp32: float
    hbm_bps: float
    l2_bps: float
    l2_bytes: int
    launch_s: float = 4e-6

    def peak(self, elem: int, ieee: bool = False) -> float:
        if elem == 2:
            return self.tflops_16bit * 1e12
        return (self.tflops_fp32 if ieee else self.tflops_tf32) * 1e12

    def live_l2(self) -> float:
        return L2_LIVE_FRACTION * self.l2_bytes


H200 = Machine("H200", tflops_16bit=790.0, tflops_tf32=395.0, tflops_fp32=60.0, hbm_bps=4.3e12,
               l2_bps=9e12, l2_bytes=60 * 2**20)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer call: T tokens, weights (d_ff, d_model), blocks of ``block_size``, ``top_k`` per
    token, element size ``elem`` (2: bf16/fp16, 4: fp32), ``by_slot``: the deterministic combine
    (also used whenever top_k == 1)."""

    T: int
    d_model: int
    d_ff: int
    block_size: int
    top_k: int
    elem: int = 2
    by_slot: bool = False

    @property
    def pairs(self) -> int:
        return self.T * self.top_k

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase's work: FLOPs, bytes through HBM, bytes through L2, kernel launches."""

    name: str
    flops: float
    hbm_bytes: float
    l2_bytes: float
    launches: int = 1

    def times(self, m: Machine, elem: int) -> dict:
        return {"flops": self.flops / m.peak(elem), "hbm": self.hbm_bytes / m.hbm_bps,
                "l2": self.l2_bytes / m.l2_bps}

    def time(self, m: Machine, elem: int) -> float:
        return max(self.times(m, elem).values()) + self.launches * m.launch_s

    def bound(self, m: Machine, elem: int) -> str:
        t = self.times(m, elem)
        return max(t, key=t.get)


PHASES = ("scoring", "routing", "fwd pre-activation", "fwd output", "dh", "dx", "dW")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the kernels run a shape: ``schedule`` "tile" or "slice" (with ``slice_d`` columns),
    ``version`` "v2" (these kernels) or "v1" (the kernels before the L2 combine: 64-row tiles at
    g >= 128, dY gathered per 64-cell chunk, dA re-read per d_model chunk, dW block-fastest, the
    backward sorting again), and the tile heights the configs give."""

    schedule: str = "tile"
    slice_d: int = 0
    version: str = "v2"
    tile_rows: int = 128
    dw_block_d: int = 128


def _miss(size_bytes: float, m: Machine) -> float:
    """Miss probability of uniformly random row accesses into ``size_bytes``."""
    return max(0.0, 1.0 - m.live_l2() / max(size_bytes, 1.0))


def _gather_hbm(rows_read: float, row_bytes: float, n_rows: int, m: Machine) -> float:
    """HBM bytes of ``rows_read`` random reads of ``row_bytes`` rows out of ``n_rows``."""
    size = n_rows * row_bytes
    return max(size, rows_read * row_bytes * _miss(size, m))


def phases(s: Shape, m: Machine = H200, plan: Plan = Plan()) -> list[Phase]:
    """The phases of one training step (forward with the pre-activation saved, backward with
    every gradient) of the sparse layer under ``plan``, in :data:`PHASES` order."""
    T, d, g, k, es, P, nb = s.T, s.d_model, s.block_size, s.top_k, s.elem, s.pairs, s.n_blocks
    v1 = plan.version == "v1"
    sliced = plan.schedule == "slice" and not v1
    bt = plan.tile_rows
    tiles = P / bt + nb
    weights = s.d_ff * d * es
    n_slices = math.ceil(d / plan.slice_d) if sliced else 1
    out = []

    # scoring: block means (one read of keys) and the fused score + top-k; 16-bit x is dotted with
    # kbar's hi and lo halves (twice the tensor-core work); kbar is re-read per 128-token tile.
    score_flops = 2 * T * d * nb * (2 if es == 2 else 1)
    out.append(Phase("scoring", score_flops + s.d_ff * d,
                     weights + nb * d * 4 + T * d * es + T * k * 4,
                     math.ceil(T / 128) * nb * d * 4, launches=2))
    sorts = 2 if v1 else 1  # v1 sorted again in the backward
    out.append(Phase("routing", 0, sorts * SORT_BYTES_PER_PAIR * P, 0, launches=6 * sorts))

    x_hbm = _gather_hbm(P, d * es, T, m)
    a_bytes = P * g * es
    pre = Phase("fwd pre-activation", 2 * P * g * d, x_hbm + weights + a_bytes,
                P * d * es + tiles * g * d * es, launches=1 if sliced else 0)
    out.append(pre)

    def combine(n_cols_live: int) -> tuple[float, float]:
        """(HBM, L2) bytes of the fp32 combine of P * d partials; the live columns decide."""
        rmw = 8 * P * d
        compulsory = T * d * 4 * 2 + T * d * es  # initialise, read back, write the output
        if s.by_slot:  # every slot reads and writes the whole accumulator once
            return max(rmw * _miss(T * d * 4, m), compulsory) + compulsory, rmw
        return rmw * _miss(T * n_cols_live * 4, m) + compulsory, rmw

    c_hbm, c_l2 = combine(plan.slice_d if sliced else d)
    if sliced:  # A re-read once per slice (from HBM: it is far larger than L2)
        fwd_out = Phase("fwd output", 2 * P * g * d, a_bytes * n_slices + weights + c_hbm,
                        tiles * g * d * es * 1 + c_l2 + a_bytes * n_slices, launches=k if
                        s.by_slot else 1)
    else:
        fwd_out = Phase("fwd output", 2 * P * g * d, weights + c_hbm, tiles * g * d * es + c_l2,
                        launches=k if s.by_slot else 1)
    out.append(fwd_out)

    # dh: dY gathered once per tile (v1: once per 64-cell chunk), A read, dA and gH written.
    dh_chunks = max(1, g // 64) if v1 else 1
    dy_hbm = _gather_hbm(P, d * es, T, m)
    out.append(Phase("dh", 2 * P * g * d, dy_hbm + weights + 3 * a_bytes,
                     P * d * es * dh_chunks + tiles * g * d * es + 3 * a_bytes))

    # dx: the dA tile once per slice (v1: once per 64-column d_model chunk, from L2).
    dx_hbm, dx_l2 = combine(plan.slice_d if sliced else d)
    da_reads = a_bytes * (d / 64 if v1 else n_slices)
    out.append(Phase("dx", 2 * P * g * d, a_bytes * n_slices + weights + dx_hbm,
                     da_reads + tiles * g * d * es + dx_l2, launches=k if s.by_slot else 1))

    # dW, twice (keys from x and dA, values from dy and gH): the gathered rows once per d_model
    # chunk program (L2), from HBM as a random gather; the buffer (dA / gH) re-read per d_model
    # chunk: from L2 when the chunk is fastest in the grid (v2), from HBM when the block is (v1).
    n_dchunks = d / (64 if v1 else plan.dw_block_d)
    src_hbm = _gather_hbm(P, d * es, T, m)
    buf_hbm = a_bytes * (n_dchunks if v1 else 1)
    out.append(Phase("dW", 2 * 2 * P * g * d, 2 * (src_hbm + buf_hbm + weights),
                     2 * (P * d * es + a_bytes * n_dchunks), launches=2))
    return out


def dense_phases(s: Shape, m: Machine = H200) -> list[Phase]:
    """The dense FFN's forward and backward (cuBLAS GEMMs at the machine's peak)."""
    f = 4 * s.T * s.d_model * s.d_ff
    w = 2 * s.d_ff * s.d_model * s.elem
    act = s.T * s.d_ff * s.elem
    return [Phase("dense fwd", f, w + 2 * act, 0, launches=3),
            Phase("dense bwd", 2 * f, 2 * w + 4 * act, 0, launches=5)]


def step_time(s: Shape, m: Machine = H200, plan: Plan = Plan()) -> float:
    return sum(p.time(m, s.elem) for p in phases(s, m, plan))


def slice_width(T: int, d_model: int, l2_bytes: int, step: int) -> int:
    """Columns per d_model slice: the widest multiple of ``step`` whose fp32 accumulator slice
    (``T * width * 4`` bytes) fits the live part of L2; at least ``step``, at most d_model."""
    width = int(L2_LIVE_FRACTION * l2_bytes // (4 * max(T, 1))) // step * step
    return max(step, min(width, math.ceil(d_model / step) * step))


def choose_schedule(T: int, d_model: int, d_ff: int, block_size: int, top_k: int, elem: int,
                    by_slot: bool, l2_bytes: int, step: int = 256) -> str:
    """The combine schedule the model predicts faster for this shape: it compares the phases
    the schedule changes (fwd pre-activation, fwd output, dx) on an H200 with this L2."""
    if top_k == 1:
        return "tile"  # nothing to combine
    m = dataclasses.replace(H200, l2_bytes=l2_bytes)
    s = Shape(T, d_model, d_ff, block_size, top_k, elem, by_slot)
    changed = ("fwd pre-activation", "fwd output", "dx")
    t = {}
    for schedule in ("tile", "slice"):
        plan = Plan(schedule, slice_width(T, d_model, l2_bytes, step))
        t[schedule] = sum(p.time(m, elem) for p in phases(s, m, plan) if p.name in changed)
    return min(t, key=t.get)


def device_l2_bytes(device) -> int:
    """L2 size PyTorch reports for a CUDA device; the H200's for anything else (the
    interpreter), so that the choice is the one the GPU would make."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return H200.l2_bytes
