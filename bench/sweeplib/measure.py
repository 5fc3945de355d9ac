"""Measurement: the environment a run records, timers, peak memory and machine ceilings."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

# Ceilings measured on one H200 (shared/VERIFYING.md), used when nothing can be measured; its L2
# bandwidth is the cost model's assumption (sfnn/triton_kernels/_model.py) until measured.
H200_TFLOPS = {"bfloat16": 790.0, "float16": 790.0}
H200_GBS = 4300.0
H200_L2_GBS = 9000.0


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "n/a"


def _quantiles(samples_ms: list) -> tuple:
    """(median, 20th percentile, 80th percentile, minimum)."""
    s = sorted(samples_ms)
    if len(s) == 1:
        return s[0], s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7], s[0]


def time_cpu(fns: dict, budget_s: float, min_reps: int = 5, max_reps: int = 50) -> dict:
    """Interleaved perf_counter timing: one warm-up call each, then rounds in which every
    provider runs once, in a fresh random order each round (seeded), until ``min_reps`` rounds
    and ``budget_s`` seconds (or ``max_reps``). Returns name -> (median, p20, p80, min, reps)
    in ms, reps being the number of timed rounds.

    Random orders, not rotated ones: a call's time depends on what ran just before it (what
    it left in or evicted from the caches: 10-20% for a decoded token), and a rotation gives
    each provider the same predecessor in most rounds."""
    names = list(fns)
    round_s = 0.0
    for n in names:
        t0 = time.perf_counter()
        fns[n]()
        round_s += time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s // max(round_s, 1e-9))))
    samples = {n: [] for n in names}
    order, rng = list(names), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: (*_quantiles(samples[n]), reps) for n in names}


def time_cuda(fns: dict, budget_s: float, min_reps: int = 0, max_reps: int = 0) -> dict:
    """``triton.testing.do_bench`` median with 20th/80th percentiles, one provider after the
    other (do_bench synchronises; the callables do not). ``budget_s`` and the rep counts belong
    to the CPU timer and are unused. Falls back to CUDA events when triton is missing."""
    out = {}
    for n, fn in fns.items():
        try:
            from triton.testing import do_bench

            med, p20, p80, low = do_bench(fn, warmup=25, rep=100,
                                          quantiles=[0.5, 0.2, 0.8, 0.0])
            out[n] = (med, p20, p80, low, -1)
        except ImportError:
            fn()
            torch.cuda.synchronize()
            samples = []
            for _ in range(20):
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            out[n] = (*_quantiles(samples), len(samples))
    return out


TIMERS = {"cpu": time_cpu, "cuda": time_cuda}


def peak_memory_cuda(fn: Callable) -> int | None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Kineto prints a line per profiler start and stop from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_cpu(fn: Callable) -> int | None:
    """Peak bytes the CPU allocator holds during one call above what it held before: the
    running sum of the allocation/free events ``torch.profiler(profile_memory=True)`` records
    (tracemalloc does not see torch's allocator). None when the profiler is unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
    except Exception:  # noqa: BLE001 - memory is a nice-to-have column
        return None
    mem = sorted((e["ts"], e["args"].get("Bytes", 0)) for e in events
                 if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    running, peak = 0, 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak


PEAK_MEMORY = {"cpu": peak_memory_cpu, "cuda": peak_memory_cuda}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Ceilings:
    tflops: dict  # dtype name -> TFLOP/s
    gbs: float  # memory (HBM / DRAM) bandwidth
    source: str
    l2_gbs: float = 0.0  # cache bandwidth (a copy that fits in L2); 0: as gbs

    def cache_gbs(self) -> float:
        return self.l2_gbs or self.gbs

    def describe(self) -> str:
        fl = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in self.tflops.items())
        return f"{fl}; {self.gbs:.4g} GB/s, cache {self.cache_gbs():.4g} GB/s ({self.source})"


def _copy_gbs(timer, device: str, elems: int) -> float:
    """Bandwidth of a copy of ``elems`` fp32 (read + write), the fastest of a few runs."""
    src = torch.empty(elems, device=device)
    dst = torch.empty_like(src)

    def cp(src=src, dst=dst):
        dst.copy_(src)

    best = timer({"copy": cp}, budget_s=1.0, min_reps=3, max_reps=10)["copy"][3]
    return 2 * elems * 4 / (best * 1e-3) / 1e9


def measure_ceilings(device: str, dtypes: list, how: str, small: bool = False) -> Ceilings:
    """A big matmul per dtype, a big copy and a cache-sized copy (2 x 8 MiB on CUDA, which L2
    holds; 2 x 256 KiB on the CPU), timed like the cases (the fastest run: a ceiling is what the
    machine can do); VERIFYING.md's H200 numbers (and the cost model's assumed 9 TB/s of L2) when
    ``how == "h200"`` or a measurement fails. ``small``: quarter-size, for smoke."""
    if how == "h200":
        return Ceilings({d: H200_TFLOPS.get(d, 790.0) for d in dtypes}, H200_GBS,
                        "H200 ceilings from shared/VERIFYING.md, L2 assumed", H200_L2_GBS)
    timer = TIMERS[device]
    n = (8192 if device == "cuda" else 2048) // (4 if small else 1)
    copy_elems = (2**28 if device == "cuda" else 2**26) // (16 if small else 1)
    tflops, parts = {}, []
    for name in dtypes:
        dt = getattr(torch, name)
        try:
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)

            def mm(a=a, b=b):
                torch.mm(a, b)

            best = timer({"mm": mm}, budget_s=1.0, min_reps=3, max_reps=10)["mm"][3]
            tflops[name] = 2 * n**3 / (best * 1e-3) / 1e12
            del a, b
        except Exception:  # noqa: BLE001
            tflops[name] = H200_TFLOPS.get(name, 790.0)
            parts.append(f"{name} matmul from VERIFYING.md")
    parts.insert(0, f"measured: {n}^3 matmul per dtype")
    try:
        gbs = _copy_gbs(timer, device, copy_elems)
        parts.append(f"{copy_elems * 4 // 2**20} MiB copy")
    except Exception:  # noqa: BLE001
        gbs = H200_GBS
        parts.append("bandwidth from VERIFYING.md")
    cache_elems = 2**21 if device == "cuda" else 2**16
    try:
        l2 = _copy_gbs(timer, device, cache_elems)
        parts.append(f"{cache_elems * 4 // 2**10} KiB cache copy")
    except Exception:  # noqa: BLE001
        l2 = H200_L2_GBS if device == "cuda" else 0.0
        parts.append("cache bandwidth assumed")
    return Ceilings(tflops, gbs, ", ".join(parts), l2)

