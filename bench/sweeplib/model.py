"""The per-phase GPU cost model of the Triton kernels, as a printed table (``sweep.py --model``).

The model itself lives beside the kernels (``sfnn/triton_kernels/_model.py``), because the
launchers use it to choose the combine schedule; this module prints it for the shapes the kernels
are judged on: one training step (forward and backward) on an H200, for the current kernels
under both combine schedules and for the v1 kernels, against the dense FFN.
"""
from __future__ import annotations

from sfnn.triton_kernels import _model as M

# The shape issue 8 judges the kernels on: T=16k tokens, d_model=4096, d_ff=32768, density 1/8.
SHAPES = [M.Shape(16384, 4096, 32768, g, 32768 // 8 // g) for g in (64, 128)]


def plans(shape: M.Shape, m: M.Machine = M.H200) -> dict:
    """Name -> Plan: the current kernels, tile and slice schedules, and the v1 kernels."""
    width = M.slice_width(shape.T, shape.d_model, m.l2_bytes, 256)
    return {"v2 tile": M.Plan("tile"), f"v2 slice ({width} cols)": M.Plan("slice", width),
            "v1": M.Plan("tile", version="v1", tile_rows=64)}


def report(shapes=None, m: M.Machine = M.H200) -> str:
    """Per phase, per plan: modelled ms and what bounds it; totals and the ratio over dense."""
    lines = [f"Cost model ({m.name}: {m.tflops_16bit:g} TFLOP/s bf16, HBM {m.hbm_bps / 1e12:g}"
             f" TB/s, L2 {m.l2_bps / 1e12:g} TB/s assumed, {m.l2_bytes / 2**20:.0f} MiB L2, "
             f"live fraction {M.L2_LIVE_FRACTION:g}); a phase takes max(FLOPs/peak, HBM "
             "bytes/bandwidth, L2 bytes/bandwidth) + launches; phases add.", ""]
    for s in shapes or SHAPES:
        ps = plans(s, m)
        dense = sum(p.time(m, s.elem) for p in M.dense_phases(s, m))
        lines.append(f"T={s.T} d_model={s.d_model} d_ff={s.d_ff} g={s.block_size} "
                     f"top_k={s.top_k} (density {s.top_k * s.block_size / s.d_ff:g}), bf16, "
                     "training step (forward + backward)")
        header = f"| {'phase':<19} |" + "".join(f" {name:>24} |" for name in ps)
        lines += [header, "|" + "---|" * (len(ps) + 1)]
        per_plan = {name: M.phases(s, m, plan) for name, plan in ps.items()}
        for i, phase in enumerate(M.PHASES):
            cells = []
            for name in ps:
                p = per_plan[name][i]
                cells.append(f"{p.time(m, s.elem) * 1e3:7.3f} ms ({p.bound(m, s.elem):>5})")
            lines.append(f"| {phase:<19} |" + "".join(f" {c:>24} |" for c in cells))
        totals = {name: sum(p.time(m, s.elem) for p in per_plan[name]) for name in ps}
        lines.append(f"| {'total':<19} |" + "".join(f" {t * 1e3:>21.2f} ms |"
                                                    for t in totals.values()))
        lines.append(f"| {'x dense':<19} |" + "".join(f" {dense / t:>23.2f}x |"
                                                      for t in totals.values()))
        auto = M.choose_schedule(s.T, s.d_model, s.d_ff, s.block_size, s.top_k, s.elem,
                                 s.by_slot, m.l2_bytes)
        lines.append(f"dense fwd+bwd (cuBLAS at peak): {dense * 1e3:.2f} ms; the auto schedule "
                     f"picks {auto!r}")
        lines.append("")
    return "\n".join(lines)


def ratios(shapes=None, m: M.Machine = M.H200) -> dict:
    """(g, plan name) -> modelled fwd+bwd speed-up over dense (for tests and notes)."""
    out = {}
    for s in shapes or SHAPES:
        dense = sum(p.time(m, s.elem) for p in M.dense_phases(s, m))
        for name, plan in plans(s, m).items():
            out[(s.block_size, name.split(" (")[0])] = dense / M.step_time(s, m, plan)
    return out
