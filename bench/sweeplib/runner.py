"""The sweep itself: time every case's providers and write the report."""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time
from collections.abc import Callable

import torch

from .cases import Case
from .contention import contention
from .cost import cost_model, floors
from .measure import (
    PEAK_MEMORY,
    TIMERS,
    Ceilings,
    device_name,
    git_commit,
    measure_ceilings,
    triton_version,
)
from .providers import (
    CHECK_RTOL,
    PROVIDERS,
    Problem,
    make_runner,
    provider_reasons,
    relative_error,
)
from .report import (
    CSV_NAME,
    MD_NAME,
    PNG_BLOCK,
    PNG_DENSITY,
    acceptance_summary,
    density_label,
    plot_speedup,
    write_csv,
    write_markdown,
)


def run_case(case: Case, device: str, ceilings: Ceilings, reasons: dict, budget_s: float,
             meta: dict, log: Callable, notes: list) -> list:
    """Time every runnable provider of ``case``, with ``case.contention`` busy processes
    running; return its CSV rows (dicts). A provider that fails on the case is left out, with a
    line in ``notes``."""
    with contention(case.contention):
        return _run_case(case, device, ceilings, reasons, budget_s, meta, log, notes)


def _run_case(case: Case, device: str, ceilings: Ceilings, reasons: dict, budget_s: float,
              meta: dict, log: Callable, notes: list) -> list:
    case.validate()
    pb = Problem(case, device)
    # Interleaved on the CPU, providers that share one set of weights warm each other's rows:
    # a decode provider timed right after "gather" finds the selected blocks in cache. Decode
    # cases (small, read-bound) give each provider its own copy of the same values.
    own_weights = device == "cpu" and case.mode == "decode"
    runners, outputs = {}, {}
    for prov in case.providers:
        if reasons.get(prov) or not PROVIDERS[prov].runs_on(case):
            continue
        try:
            runners[prov], outputs[prov] = make_runner(
                prov, Problem(case, device) if own_weights else pb)
        except Exception as err:  # noqa: BLE001 - record, keep sweeping
            msg = (f"{prov} skipped on {case.mode} T={case.tokens} d={case.d_model} "
                   f"d_ff={case.d_ff} g={case.block_size} k={case.top_k} {case.dtype}: "
                   f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")
            log("  " + msg)
            notes.append(msg)
    if not runners:
        return []
    ref = None
    if case.mode in ("forward", "decode", "forward+backward"):
        from sfnn.reference import sparse_ffn_ref

        with torch.no_grad():
            ref = sparse_ffn_ref(pb.x, pb.keys, pb.values, block_size=case.block_size,
                                 top_k=case.top_k, key_bias=pb.key_bias, out_bias=pb.out_bias,
                                 activation=case.activation, **pb.gated_kwargs())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    times = TIMERS[device](runners, budget_s, min_reps=case.min_reps)
    mem = {p: PEAK_MEMORY[device](fn) for p, fn in runners.items()}
    costs = cost_model(case, pb.distinct_blocks)
    peak_fl = ceilings.tflops.get(case.dtype, next(iter(ceilings.tflops.values())))
    floor_s, floor_hbm_s = floors(costs, peak_fl, ceilings.gbs, ceilings.cache_gbs())
    dense_ms = times["dense"][0] if "dense" in times else None
    rows = []
    for prov, (med, p20, p80, low, reps) in times.items():
        sec = med * 1e-3
        prov_flops = costs["dense_flops"] if PROVIDERS[prov].dense_flops \
            else costs["floor_flops"]
        rel = check = ""
        if ref is not None and PROVIDERS[prov].checked:
            rel = relative_error(outputs[prov], ref)
            check = "ok" if rel <= CHECK_RTOL[case.dtype] else "MISMATCH"
        rows.append({
            **meta, "tag": case.tag, "mode": case.mode, "provider": prov, "dtype": case.dtype,
            "activation": case.activation, "tokens": case.tokens, "d_model": case.d_model,
            "d_ff": case.d_ff, "block_size": case.block_size, "top_k": case.top_k,
            "n_blocks": case.n_blocks, "density": case.density,
            "distinct_blocks": pb.distinct_blocks, "ms": med, "ms_p20": p20, "ms_p80": p80,
            "ms_min": low, "reps": reps, "useful_tflops": costs["useful_flops"] / sec / 1e12,
            "provider_tflops": prov_flops / sec / 1e12,
            "gbs": costs["floor_bytes"] / sec / 1e9,
            "speedup_vs_dense": dense_ms / med if dense_ms else "",
            "peak_mem_mb": mem[prov] / 2**20 if mem[prov] is not None else "n/a",
            "floor_ms": floor_s * 1e3, "frac_of_floor": floor_s / sec,
            "floor_hbm_ms": floor_hbm_s * 1e3,
            "floor_flops": costs["floor_flops"], "floor_bytes": costs["floor_bytes"],
            "combine_bytes": costs["combine_bytes"],
            "ceiling_tflops": peak_fl, "ceiling_gbs": ceilings.gbs,
            "ceiling_l2_gbs": ceilings.cache_gbs(),
            "ceiling_source": ceilings.source, "rel_err": rel, "check": check,
            "load_1m": load, "contention": case.contention, "gated": case.gated,
        })
    return rows


class Interrupted(Exception):
    """SIGTERM arrived during the sweep."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def run_metadata(device: str, preset: str) -> dict:
    """Where and when: the columns every CSV row repeats."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device, "device_name": device_name(device), "torch": torch.__version__,
        "triton": triton_version(), "sfnn_commit": git_commit(), "preset": preset,
        "threads": torch.get_num_threads() if device == "cpu" else "",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "") if device == "cpu" else "",
        "load": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"}


def run_sweep(cases: list, *, device: str, out_dir: str, preset: str, budget: float,
              max_minutes: float | None, ceilings_how: str, threads: int) -> int:
    """Time ``cases`` on ``device``, write CSV, markdown and plots into ``out_dir``; 0 when
    any row was measured. Stops starting cases after ``max_minutes`` (None: no limit) or on
    SIGTERM, and still writes what was measured."""
    meta = run_metadata(device, preset)
    reasons = provider_reasons(device)
    print(f"sfnn sweep: preset={preset} device={device} ({meta['device_name']}) "
          f"torch={meta['torch']} triton={meta['triton']} sfnn={meta['sfnn_commit']} "
          f"cases={len(cases)} load={meta['load']}", flush=True)
    for p in sorted({p for c in cases for p in c.providers}):
        if reasons.get(p):
            print(f"provider {p}: not run ({reasons[p]})", flush=True)
    t_start = time.perf_counter()
    ceilings = measure_ceilings(device, sorted({c.dtype for c in cases}), ceilings_how,
                                small=preset == "smoke")
    print(f"ceilings: {ceilings.describe()}", flush=True)

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        tqdm = None
    # A bar on a terminal for long sweeps; logs (not a terminal) get one line per case instead.
    show_bar = tqdm is not None and len(cases) >= 8 and sys.stderr.isatty()
    bar = tqdm(total=len(cases), file=sys.stderr, mininterval=1.0) if show_bar else None

    def log(msg: str) -> None:
        if bar is not None:
            bar.write(msg)
        else:
            print(msg, flush=True)

    rows, notes = [], []
    done = 0
    # SIGTERM (e.g. from `timeout`) ends the sweep like --max-minutes: what was measured is
    # still written.
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    for i, case in enumerate(cases):
        if max_minutes is not None and time.perf_counter() - t_start > 60 * max_minutes:
            notes.append(f"stopped after {i} of {len(cases)} cases: --max-minutes "
                         f"{max_minutes} reached")
            log(notes[-1])
            break
        label = (f"[{i + 1}/{len(cases)}] {case.mode} T={case.tokens} d={case.d_model} "
                 f"d_ff={case.d_ff} g={case.block_size} k={case.top_k} "
                 f"({density_label(case.density)}) {case.dtype} {case.activation}"
                 + (f" contention={case.contention}" if case.contention else ""))
        try:
            new = run_case(case, device, ceilings, reasons, budget, meta, log, notes)
        except (Interrupted, KeyboardInterrupt) as err:
            notes.append(f"interrupted ({type(err).__name__}) during case {i + 1} of "
                         f"{len(cases)}; the rows before it are kept")
            log(notes[-1])
            break
        except Exception as err:  # noqa: BLE001 - one failing case must not end the sweep
            new = []
            notes.append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            log(f"{label}\n  FAILED: {notes[-1]}")
        if new:
            parts = [f"{r['provider']} {r['ms']:.3g} ms"
                     + (f" ({r['speedup_vs_dense']:.2f}x)" if r["speedup_vs_dense"] != ""
                        and r["provider"] != "dense" else "")
                     + (" MISMATCH" if r["check"] == "MISMATCH" else "") for r in new]
            log(f"{label}: " + ", ".join(parts))
            if any(r["check"] == "MISMATCH" for r in new):
                notes.append(f"{label}: output differs from the reference: " + ", ".join(
                    f"{r['provider']} rel_err={r['rel_err']:.2e}" for r in new
                    if r["check"] == "MISMATCH"))
        rows += new
        done += 1
        if bar is not None:
            bar.update(1)
        if case.tag in ("acceptance", "gated-acceptance") and (
                i + 1 == len(cases) or cases[i + 1].tag != case.tag
                or cases[i + 1].contention != case.contention):
            for line in acceptance_summary(rows):
                log(line)
        if device == "cuda":
            torch.cuda.empty_cache()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the files below be written
    if bar is not None:
        bar.close()
    for p in sorted({p for c in cases for p in c.providers}):
        if reasons.get(p):
            notes.append(f"provider {p} not run: {reasons[p]}")
    loads = [r["load_1m"] for r in rows if r["load_1m"] != ""]
    if device == "cpu" and loads and max(loads) > threads + 1:
        notes.insert(0, f"the 1-minute load average reached {max(loads):.1f} on "
                        f"{os.cpu_count()} cores (threads={threads}): other processes "
                        "shared the CPU, so times are inflated and noisy; ms_min in the CSV is "
                        "the least disturbed run. Spinning OpenMP threads suffer most from "
                        "this: OMP_WAIT_POLICY=PASSIVE (set before starting) helps paths made "
                        "of many small ops")

    write_csv(rows, os.path.join(out_dir, CSV_NAME))
    write_markdown(rows, os.path.join(out_dir, MD_NAME), meta, ceilings, notes)
    plot_speedup(rows, os.path.join(out_dir, PNG_DENSITY), "density", "block_size",
                 f"sfnn speedup over dense vs density - {meta['device_name']}")
    plot_speedup(rows, os.path.join(out_dir, PNG_BLOCK), "block_size", "density",
                 f"sfnn speedup over dense vs block size - {meta['device_name']}")
    acc = acceptance_summary(rows)
    if acc:
        print("\n".join(acc))
    print(f"{len(rows)} rows from {done}/{len(cases)} cases in "
          f"{time.perf_counter() - t_start:.0f} s -> {out_dir}/{{{CSV_NAME},{MD_NAME},"
          f"{PNG_DENSITY},{PNG_BLOCK}}}", flush=True)
    signal.signal(signal.SIGTERM, previous)
    return 0 if rows else 1
