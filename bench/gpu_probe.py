#!/usr/bin/env python
"""GPU probe: what the cost model assumes, measured; every phase of the layer timed alone.

    python bench/gpu_probe.py --out DIR [--max-seconds S] [--reps N] [--dry-run]

1. fp32 ``atomic_add`` throughput (the combine's read-modify-write) into an L2-resident buffer
   (16 MiB) and an HBM-sized one (1 GiB), rows hit at random as the block-major combine does.
2. The dense FFN (cuBLAS: ``linear -> gelu -> linear``) forward and backward at each shape.
3. The sparse layer at each shape (bf16, T=16384, d_model=4096, d_ff=32768, density 1/8,
   g=128 then g=64) under both combine schedules ("tile", "slice"): after a warm-up that
   autotunes every kernel, each phase (scoring, routing, fwd pre-activation, fwd output, dh, dx,
   dW; "fwd fused" under the tile schedule) is bracketed by CUDA events (the probe wraps the
   launchers' kernel launches and sort), medians over ``--reps`` steps, next to the cost model's
   figure for the same phase (``sfnn/triton_kernels/_model.py``).

Writes ``gpu_probe.csv`` and ``gpu_probe.md`` into ``--out`` after every part, so a time limit
still leaves what was measured; stops starting parts after ``--max-seconds``.

``--dry-run`` runs the same code on the CPU at tiny shapes, the kernels in Triton's interpreter
and ``time.perf_counter`` for events: it checks the probe's plumbing (the atomic kernel's sums,
the phase bookkeeping, the files), not speed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import datetime
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CSV_NAME, MD_NAME = "gpu_probe.csv", "gpu_probe.md"
FIELDS = ["date", "device_name", "torch", "triton", "sfnn_commit", "part", "T", "d_model", "d_ff",
          "block_size", "top_k", "schedule", "slice_d", "phase", "ms", "ms_p20", "ms_p80",
          "model_ms", "gbs", "note"]
PHASE_OF_KIND = {"fwd": "fwd fused", "pre": "fwd pre-activation", "out": "fwd output",
                 "dh": "dh", "dx": "dx", "dw": "dW"}
PHASE_ORDER = ("scoring", "routing", "fwd fused", "fwd pre-activation", "fwd output", "dh", "dx",
               "dW", "fwd other", "bwd other", "fwd+bwd")


class Clock:
    """CUDA events on a GPU, perf_counter on the CPU: ``mark()`` now, ``ms(a, b)`` after
    ``sync()``."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _quantiles(xs: list) -> tuple:
    s = sorted(xs)
    if len(s) < 3:
        return s[len(s) // 2], s[0], s[-1]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def atomic_kernel():
    """The probe's atomic kernel: BLOCK_R random rows of an fp32 (rows, n_cols) buffer each get
    ``+1.0`` in every column, BLOCK_C columns at a time (relaxed fp32 atomics, as the combine)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _atomic_rows_kernel(buf_ptr, rows_ptr, n_cols, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        i_p = tl.program_id(0)
        o_r = i_p * BLOCK_R + tl.arange(0, BLOCK_R)
        row = tl.load(rows_ptr + o_r).to(tl.int64)  # [BLOCK_R]
        ones = tl.full([BLOCK_R, BLOCK_C], 1.0, tl.float32)
        for c0 in range(0, n_cols, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            tl.atomic_add(buf_ptr + row[:, None] * n_cols + o_c[None, :], ones,
                          mask=(o_c < n_cols)[None, :], sem="relaxed")

    return _atomic_rows_kernel


def probe_atomics(device: str, clock: Clock, reps: int, dry: bool) -> list:
    """fp32 atomic-add throughput into a small (L2) and a large (HBM) buffer."""
    import torch

    kernel = atomic_kernel()
    n_cols, block_r, block_c = (64, 16, 32) if dry else (4096, 64, 128)
    updates = 256 if dry else 2**18  # row updates; x n_cols atomics each
    sizes = {"L2 (16 MiB)": 2**24, "HBM (1 GiB)": 2**30} if not dry else \
        {"L2 (16 MiB)": 2**14, "HBM (1 GiB)": 2**16}
    rows_out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for label, nbytes in sizes.items():
        n_rows = nbytes // (4 * n_cols)
        buf = torch.zeros(n_rows, n_cols, device=device, dtype=torch.float32)
        rows = torch.randint(0, n_rows, (updates,), device=device, generator=gen,
                             dtype=torch.int32)
        grid = (updates // block_r,)

        def run(buf=buf, rows=rows, grid=grid):
            kernel[grid](buf, rows, n_cols, BLOCK_R=block_r, BLOCK_C=block_c)

        run()
        clock.sync()
        want = torch.bincount(rows.long(), minlength=n_rows).to(torch.float32)
        if not torch.equal(buf[:, 0], want) or not torch.equal(buf[:, -1], want):
            raise AssertionError(f"atomic probe ({label}): sums are wrong")
        times = []
        for _ in range(reps):
            a = clock.mark()
            run()
            b = clock.mark()
            clock.sync()
            times.append(clock.ms(a, b))
        med, p20, p80 = _quantiles(times)
        elems = updates * n_cols
        rows_out.append(dict(part="atomics", phase=label, ms=med, ms_p20=p20, ms_p80=p80,
                             gbs=8 * elems / (med * 1e-3) / 1e9,
                             note=f"{elems} fp32 atomics, 8 bytes of read-modify-write each"))
        del buf
    return rows_out


def probe_dense(shape, device: str, clock: Clock, reps: int) -> list:
    """The dense FFN (cuBLAS GEMMs) forward and backward, bf16."""
    import torch
    import torch.nn.functional as F

    T, d, d_ff = shape.T, shape.d_model, shape.d_ff
    dt = torch.bfloat16
    x = torch.randn(T, d, device=device, dtype=dt, requires_grad=True)
    w1 = (torch.randn(d_ff, d, device=device, dtype=dt) / d**0.5).requires_grad_()
    b1 = torch.zeros(d_ff, device=device, dtype=dt, requires_grad=True)
    w2 = (torch.randn(d, d_ff, device=device, dtype=dt) / d_ff**0.5).requires_grad_()
    b2 = torch.zeros(d, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(T, d, device=device, dtype=dt)
    fwd, bwd = [], []
    for i in range(reps + 2):
        a = clock.mark()
        y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        b = clock.mark()
        y.backward(dy)
        c = clock.mark()
        clock.sync()
        for t in (x, w1, b1, w2, b2):
            t.grad = None
        if i >= 2:  # warm-up
            fwd.append(clock.ms(a, b))
            bwd.append(clock.ms(b, c))
    out = []
    for phase, xs in (("dense fwd", fwd), ("dense bwd", bwd),
                      ("dense fwd+bwd", [f + b for f, b in zip(fwd, bwd, strict=True)])):
        med, p20, p80 = _quantiles(xs)
        out.append(dict(part="dense", phase=phase, ms=med, ms_p20=p20, ms_p80=p80))
    return out


@contextlib.contextmanager
def phase_events(clock: Clock, sink: dict):
    """Brackets every kernel launch and pair sort of the block-FFN launchers with clock marks,
    appending ``(phase, start, end)`` to ``sink["marks"]``."""
    from sfnn.triton_kernels import block_ffn

    real_launch, real_sort = block_ffn._launch, block_ffn.sort_pairs

    def launch(kernel, kind, *args, **kwargs):
        a = clock.mark()
        real_launch(kernel, kind, *args, **kwargs)
        sink["marks"].append((PHASE_OF_KIND[kind], a, clock.mark()))

    def sort(*args, **kwargs):
        a = clock.mark()
        out = real_sort(*args, **kwargs)
        sink["marks"].append(("routing", a, clock.mark()))
        return out

    block_ffn._launch, block_ffn.sort_pairs = launch, sort
    try:
        yield
    finally:
        block_ffn._launch, block_ffn.sort_pairs = real_launch, real_sort


def probe_sparse(shape, schedule: str, device: str, clock: Clock, reps: int,
                 dry: bool) -> tuple[list, dict]:
    """Every phase of one training step of the sparse layer under ``schedule``; returns the
    rows and the per-phase medians."""
    import torch
    from sfnn.triton_kernels import _model, avgk_topk, block_ffn, block_means

    T, d, d_ff, g, k = shape.T, shape.d_model, shape.d_ff, shape.block_size, shape.top_k
    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(1)

    def rnd(*s, scale=1.0):
        return torch.randn(*s, device=device, dtype=torch.float32, generator=gen).mul_(
            scale).to(dt)

    x, dy = rnd(T, d), rnd(T, d)
    keys, values = rnd(d_ff, d, scale=d**-0.5), rnd(d_ff, d, scale=(k * g) ** -0.5)
    key_bias, out_bias = rnd(d_ff, scale=0.1), rnd(d, scale=0.1)
    slice_d = 32 if dry and schedule == "slice" else None
    kw = dict(block_size=g, activation="gelu", deterministic=False, schedule=schedule,
              slice_d=slice_d)

    def step(sink):
        a = clock.mark()
        kbar, bbar = block_means.block_means(keys, key_bias, g)
        idx = avgk_topk.avgk_topk(x, kbar, bbar, k)
        b = clock.mark()
        sink["marks"].append(("scoring", a, b))
        y, saved, route = block_ffn.block_ffn_fwd(x, keys, values, idx, key_bias, out_bias, None,
                                                  save_for_backward=True, **kw)
        c = clock.mark()
        block_ffn.block_ffn_bwd(dy, x, keys, values, idx, key_bias, None, saved, route, **kw)
        e = clock.mark()
        sink["spans"] = (b, c, e)

    for _ in range(1 if dry else 2):  # warm-up: compiles and autotunes every kernel
        step({"marks": []})
    clock.sync()
    per_step = []
    for _ in range(reps):
        sink = {"marks": []}
        with phase_events(clock, sink):
            step(sink)
        clock.sync()
        t = collections.defaultdict(float)
        for phase, a, b in sink["marks"]:
            t[phase] += clock.ms(a, b)
        b, c, e = sink["spans"]
        fwd_ms, bwd_ms = clock.ms(b, c), clock.ms(c, e)
        fwd_kernels = sum(t.get(p, 0.0) for p in ("routing", "fwd fused", "fwd pre-activation",
                                                  "fwd output"))
        t["fwd other"] = fwd_ms - fwd_kernels  # accumulator init, the output cast
        t["bwd other"] = bwd_ms - sum(t.get(p, 0.0) for p in ("dh", "dx", "dW"))
        t["fwd+bwd"] = t["scoring"] + fwd_ms + bwd_ms
        per_step.append(t)

    width = block_ffn.resolve_schedule(schedule, T, d, d_ff, g, k, 2, False,
                                       torch.device(device), slice_d)[1]
    m = _model.H200
    if device == "cuda":
        m = dataclasses.replace(m, l2_bytes=_model.device_l2_bytes(torch.device(device)))
    plan = _model.Plan(schedule, width if schedule == "slice" else 0)
    model = {p.name: p.time(m, 2) * 1e3 for p in _model.phases(
        _model.Shape(T, d, d_ff, g, k), m, plan)}
    if schedule == "tile":
        model["fwd fused"] = model.pop("fwd pre-activation") + model.pop("fwd output")
    model["fwd+bwd"] = sum(model.values())
    rows, medians = [], {}
    chosen = autotuned_configs()
    if chosen:
        rows.append(dict(part="sparse", schedule=schedule, slice_d=width, phase="configs",
                         note=chosen))
    for phase in PHASE_ORDER:
        xs = [t[phase] for t in per_step if phase in t]
        if not xs:
            continue
        med, p20, p80 = _quantiles(xs)
        medians[phase] = med
        rows.append(dict(part="sparse", schedule=schedule, slice_d=width, phase=phase, ms=med,
                         ms_p20=p20, ms_p80=p80, model_ms=model.get(phase, "")))
    return rows, medians


def autotuned_configs() -> str:
    """The config the autotuner chose last for each block-FFN kernel ("" under the
    interpreter, which has one config per kernel)."""
    import triton
    from sfnn.triton_kernels import block_ffn

    out = []
    for name in ("fwd", "pre", "out", "dh", "dx", "dw"):
        tuner = getattr(block_ffn, f"_block_ffn_{name}_kernel")
        while not isinstance(tuner, triton.runtime.Autotuner):
            tuner = tuner.fn
        best = getattr(tuner, "best_config", None)
        if best is not None and len(tuner.configs) > 1:
            out.append(f"{name}: {getattr(best, 'name', str(best))}")
    return "; ".join(out)


def write(out_dir: str, meta: dict, rows: list, notes: list) -> None:
    with open(os.path.join(out_dir, CSV_NAME), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                        for k, v in {**meta, **r}.items()})
    md = [f"# sfnn GPU probe: {meta['device_name']}", "",
          f"{meta['date']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"sfnn {meta['sfnn_commit']}", ""]
    atom = [r for r in rows if r["part"] == "atomics"]
    if atom:
        md += ["## fp32 atomic adds (8 bytes of read-modify-write per element)", "",
               "| buffer | ms (p20-p80) | GB/s |", "|---|---|---|"]
        md += [f"| {r['phase']} | {r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | "
               f"{r['gbs']:.0f} |" for r in atom]
        md.append("")
    shapes = []
    for r in rows:
        key = (r.get("T"), r.get("d_model"), r.get("d_ff"), r.get("block_size"), r.get("top_k"))
        if r["part"] in ("dense", "sparse") and key not in shapes:
            shapes.append(key)
    for key in shapes:
        T, d, d_ff, g, k = key
        mine = [r for r in rows if (r.get("T"), r.get("d_model"), r.get("d_ff"),
                                    r.get("block_size"), r.get("top_k")) == key]
        md += [f"## T={T} d_model={d} d_ff={d_ff} g={g} top_k={k}, bf16", ""]
        dense = {r["phase"]: r["ms"] for r in mine if r["part"] == "dense"}
        if dense:
            md.append("Dense (cuBLAS): " + ", ".join(f"{p} {v:.3f} ms" for p, v in dense.items()))
            md.append("")
        scheds = [s for s in ("tile", "slice") if any(r.get("schedule") == s for r in mine)]
        if scheds:
            md += ["| phase | " + " | ".join(f"{s} ms (model ms)" for s in scheds) + " |",
                   "|---|" + "---|" * len(scheds)]
            for phase in PHASE_ORDER:
                cells = []
                for s in scheds:
                    hit = [r for r in mine if r.get("schedule") == s and r["phase"] == phase]
                    if hit:
                        mm = hit[0]["model_ms"]
                        cells.append(f"{hit[0]['ms']:.3f}" + (f" ({mm:.3f})" if mm != "" else ""))
                    else:
                        cells.append("-")
                if any(c != "-" for c in cells):
                    md.append(f"| {phase} | " + " | ".join(cells) + " |")
            for s in scheds:
                cfg = [r for r in mine if r.get("schedule") == s and r["phase"] == "configs"]
                if cfg:
                    md.append(f"\n{s}: autotuned configs: {cfg[0]['note']}")
            if "dense fwd+bwd" in dense:
                for s in scheds:
                    tot = [r["ms"] for r in mine if r.get("schedule") == s
                           and r["phase"] == "fwd+bwd"]
                    if tot:
                        md.append(f"\n{s}: fwd+bwd {tot[0]:.3f} ms = "
                                  f"{dense['dense fwd+bwd'] / tot[0]:.2f}x dense (measured)")
            md.append("")
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes]
    with open(os.path.join(out_dir, MD_NAME), "w") as f:
        f.write("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--max-seconds", type=float, default=float("inf"),
                    help="start no new part after this many seconds")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, Triton's interpreter: check the plumbing")
    args = ap.parse_args(argv)
    if args.dry_run:  # read when the kernels are decorated: before importing them
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    sys.path.insert(0, HERE)
    from sfnn.triton_kernels import _model
    from sweeplib.measure import device_name, git_commit, triton_version

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU (use --dry-run to check the probe on the CPU)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()
    clock = Clock(device)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device_name": device_name(device), "torch": torch.__version__,
            "triton": triton_version(), "sfnn_commit": git_commit()}
    if args.dry_run:  # two d_model slices of 32 under "slice"
        shapes = [_model.Shape(32, 64, 128, 16, 2)]
        args.reps = min(args.reps, 1)  # the code path, not a timing: one step after warm-up
    else:
        shapes = [_model.Shape(16384, 4096, 32768, g, 32768 // 8 // g) for g in (128, 64)]
    rows, notes = [], []
    if args.dry_run:
        notes.append("dry run: CPU, Triton's interpreter, perf_counter; not a measurement")

    def over() -> bool:
        return time.monotonic() - t0 > args.max_seconds

    def log(msg):
        print(f"[gpu_probe +{time.monotonic() - t0:.0f}s] {msg}", flush=True)

    parts = [("atomics", None, None)]
    for s in shapes:
        parts += [("dense", s, None), ("sparse", s, "tile"), ("sparse", s, "slice")]
    for part, shape, schedule in parts:
        if over():
            notes.append(f"stopped before {part} {shape} {schedule or ''}: --max-seconds "
                         f"{args.max_seconds:g} reached")
            log(notes[-1])
            break
        where = {} if shape is None else dict(T=shape.T, d_model=shape.d_model, d_ff=shape.d_ff,
                                              block_size=shape.block_size, top_k=shape.top_k)
        try:
            if part == "atomics":
                new = probe_atomics(device, clock, args.reps, args.dry_run)
            elif part == "dense":
                new = probe_dense(shape, device, clock, args.reps)
            else:
                new, med = probe_sparse(shape, schedule, device, clock, args.reps, args.dry_run)
        except Exception as err:  # noqa: BLE001 - one failing part must not end the probe
            notes.append(f"{part} {schedule or ''} {where}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:300] if str(err) else ''}")
            log(f"FAILED: {notes[-1]}")
            if args.dry_run:
                raise
            continue
        new = [{**where, **r} for r in new]
        rows += new
        log(f"{part} {schedule or ''} {where}: " + ", ".join(
            f"{r['phase']} {r['ms']:.3f} ms" for r in new if "ms" in r))
        write(args.out, meta, rows, notes)
        if device == "cuda":
            torch.cuda.empty_cache()
    write(args.out, meta, rows, notes)
    log(f"{len(rows)} rows -> {args.out}/{{{CSV_NAME},{MD_NAME}}}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
