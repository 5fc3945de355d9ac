#!/usr/bin/env python
"""Throughput sweep of sfnn's block-sparse FFN against the dense FFN it replaces.

    python bench/sweep.py [--preset default|quick|smoke|full] [--out DIR] [--device cpu|cuda]

Each *case* is one problem (tokens, d_model, d_ff, block_size, top_k, dtype, activation, mode);
each *provider* is one way to compute it:

- ``dense``: ``nn.Sequential(nn.Linear(d, d_ff), act, nn.Linear(d_ff, d))``, the baseline;
- ``naive``: ``sfnn.reference.sparse_ffn_ref``, the dense-masked oracle a user would write first;
- ``gather``: per-token gathered weight rows and two batched matrix-vector products (only where
  the gathered copies fit in memory, so in practice decoding);
- ``torch`` / ``triton`` / ``cuda``: ``sfnn.sparse_ffn(..., backend=...)`` (each only where it
  can run: triton on CUDA tensors, cuda when ``sfnn.cuda_ext.available()`` and only in decode,
  as the extension is forward-only).

Modes: ``forward`` (a training forward: parameters and x require grad), ``backward`` (the
backward of one such forward, repeated with ``retain_graph``), ``forward+backward``, and
``decode`` (a few tokens under ``torch.no_grad()``). In the training modes the keys' version
counter is bumped before each sfnn call so the block means are recomputed as after an optimizer
step; decoding keeps sfnn's cached block means, as weights do not change while decoding.

Per (case, provider) one CSV row: median time with 20th/80th percentiles, useful TFLOP/s (only
the sparse GEMM FLOPs of SPEC.md), GB/s over the fewest bytes, speedup over dense, peak memory,
the analytic floor and the fraction of it reached. Plus a markdown table and two PNG plots.
See bench/README.md for the meaning of every column.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn

MODES = ("forward", "backward", "forward+backward", "decode")
PROVIDERS = ("dense", "naive", "gather", "torch", "triton", "cuda")
SPARSE_BACKENDS = ("torch", "triton", "cuda")
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Relative-norm error of a provider's forward output against the reference above which the
# row is flagged: selection near-ties may flip in low precision, so 16-bit bounds are loose.
CHECK_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
# Ceilings measured on one H200 (shared/VERIFYING.md), used when nothing can be measured.
H200_TFLOPS = {"bfloat16": 790.0, "float16": 790.0}
H200_GBS = 4300.0
GATHER_MAX_BYTES = 512 * 2**20
CSV_NAME, MD_NAME = "sweep.csv", "sweep.md"
PNG_DENSITY, PNG_BLOCK = "speedup_vs_density.png", "speedup_vs_block_size.png"
ACCEPTANCE_TARGETS = {"forward": 2.5, "forward+backward": 2.0}
# The CPU presets promise a wall time (default <= 4 min, quick < 2 min on 2 cores): a slow path
# or a busy machine drops the tail cases, with a note, rather than overrunning.
CPU_MAX_MINUTES = {"default": 3.5, "quick": 1.75}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem; every provider in ``providers`` is timed on it, interleaved."""

    tokens: int
    d_model: int
    d_ff: int
    block_size: int
    top_k: int
    mode: str
    dtype: str = "float32"
    activation: str = "gelu"
    providers: tuple = ("dense", "torch", "triton", "cuda")
    tag: str = ""
    min_reps: int = 5  # CPU: timed rounds at least (more when they fit the per-case budget)

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size

    @property
    def density(self) -> float:
        return self.top_k * self.block_size / self.d_ff

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.d_ff % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide d_ff {self.d_ff}")
        if not 1 <= self.top_k <= self.n_blocks:
            raise ValueError(f"top_k {self.top_k} not in [1, n_blocks={self.n_blocks}]")
        unknown = set(self.providers) - set(PROVIDERS)
        if unknown:
            raise ValueError(f"unknown providers {sorted(unknown)}")


def top_k_for(d_ff: int, block_size: int, density: float) -> int | None:
    """The top_k giving ``density`` exactly, or None when it is not a whole number >= 1."""
    k = density * d_ff / block_size
    if k < 1 or abs(k - round(k)) > 1e-9 or d_ff % block_size:
        return None
    return int(round(k))


def grid(tokens, d_models, ffn_mult, block_sizes, densities, modes, **kw) -> list:
    """Every valid case of a cartesian grid; d_ff = ffn_mult * d_model."""
    cases = []
    for mode in modes:
        for t in tokens:
            for d in d_models:
                for g in block_sizes:
                    for rho in densities:
                        k = top_k_for(ffn_mult * d, g, rho)
                        if k is not None:
                            cases.append(Case(t, d, ffn_mult * d, g, k, mode, **kw))
    return cases


ACCEPTANCE = dict(tokens=4096, d_model=512, d_ff=8192, block_size=64, top_k=16, dtype="float32",
                  activation="gelu")


def preset_default(device: str) -> list:
    """The README's main job. On CPU the lead's acceptance shape comes first (torch vs dense,
    forward and forward+backward), then density and block-size sweeps around it (<= 4 min on
    2 cores). On CUDA a bf16 headline shape with the same sweeps, decode, and fp32."""
    if device == "cpu":
        cases = [Case(**ACCEPTANCE, mode=m, providers=("dense", "torch"), tag="acceptance",
                      min_reps=7) for m in ("forward", "forward+backward")]
        shape = dict(tokens=4096, d_model=512, d_ff=8192, dtype="float32", activation="gelu")
        for mode in ("forward", "forward+backward"):
            for g, k in ((64, 32), (64, 8), (32, 32), (128, 8)):  # 1/4, 1/16; g=32, 128 at 1/8
                cases.append(Case(**shape, block_size=g, top_k=k, mode=mode,
                                  providers=("dense", "torch"), min_reps=3))
        cases.append(Case(**ACCEPTANCE, mode="forward", providers=("dense", "naive", "torch"),
                          min_reps=3))
        for t in (1, 8):
            cases.append(Case(t, 512, 8192, 64, 16, "decode",
                              providers=("dense", "naive", "gather", "torch")))
        return cases
    # GPU: ordered by value per second, as --max-minutes may cut the tail. Each new block size
    # or dtype costs Triton autotuning (compiles), so the g=64 bf16 cases come first.
    head = dict(d_model=2048, d_ff=8192, dtype="bfloat16", activation="gelu")
    every = ("dense", "naive", "torch", "triton", "cuda")
    fast = ("dense", "torch", "triton")
    train = ("forward", "forward+backward")
    cases = [Case(4096, **head, block_size=64, top_k=16, mode=m, providers=every, tag="headline")
             for m in ("forward", "backward", "forward+backward")]
    for t in (1, 8):
        cases.append(Case(t, **head, block_size=64, top_k=16, mode="decode",
                          providers=("dense", "naive", "gather", "torch", "triton", "cuda")))
    for mode in train:
        for rho in (1 / 4, 1 / 16, 1 / 32):
            cases.append(Case(4096, **head, block_size=64, top_k=top_k_for(8192, 64, rho),
                              mode=mode, providers=fast))
    for mode in train:
        cases.append(Case(16384, **head, block_size=64, top_k=16, mode=mode, providers=fast))
    for g in (16, 32, 128, 256):
        for mode in train:
            cases.append(Case(4096, **head, block_size=g, top_k=top_k_for(8192, g, 1 / 8),
                              mode=mode, providers=fast))
    cases.append(Case(4096, 2048, 8192, 64, 16, "forward", dtype="float32", activation="gelu",
                      providers=fast))
    return cases


def preset_quick(device: str) -> list:
    """Densities 1/4, 1/8, 1/16 x block sizes 32, 64, 128, forward and forward+backward
    (under 2 minutes on a 2-core CPU)."""
    if device == "cpu":
        return grid([2048], [512], 8, [32, 64, 128], [1 / 4, 1 / 8, 1 / 16],
                    ["forward", "forward+backward"], providers=("dense", "torch"))
    return grid([4096], [2048], 4, [32, 64, 128], [1 / 4, 1 / 8, 1 / 16],
                ["forward", "forward+backward"], dtype="bfloat16",
                providers=("dense", "torch", "triton", "cuda"))


def preset_smoke(device: str) -> list:
    """Seconds: tiny shapes, every mode, every provider that can run (used by the tests);
    just enough points for both plots to draw lines."""
    every = ("dense", "naive", "gather", "torch", "triton", "cuda")
    tiny = dict(tokens=64, d_model=64, d_ff=256, providers=every, min_reps=3)
    cases = [Case(**tiny, block_size=g, top_k=k, mode="forward")
             for g, k in ((16, 4), (16, 2), (32, 2), (32, 1))]
    cases += [Case(**tiny, block_size=16, top_k=k, mode="forward+backward") for k in (4, 2)]
    cases.append(Case(**tiny, block_size=16, top_k=4, mode="backward"))
    cases.append(Case(4, 64, 256, 16, 2, "decode", activation="relu", providers=every,
                      min_reps=3))
    return cases


def preset_full(device: str) -> list:
    """The whole grid (meant for a GPU): tokens x d_model x block size x density x mode."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    every = ("dense", "naive", "torch", "triton", "cuda")
    cases = grid([512, 4096, 16384], [512, 1024, 2048, 4096], 4, [16, 32, 64, 128, 256],
                 [1 / 4, 1 / 8, 1 / 16, 1 / 32], ["forward", "backward", "forward+backward"],
                 dtype=dtype, providers=every)
    cases += grid([1, 8], [512, 1024, 2048, 4096], 4, [16, 32, 64, 128, 256],
                  [1 / 4, 1 / 8, 1 / 16, 1 / 32], ["decode"], dtype=dtype,
                  providers=every[:2] + ("gather",) + every[2:])
    return cases


PRESETS = {"default": preset_default, "quick": preset_quick, "smoke": preset_smoke,
           "full": preset_full}


# ----------------------------------------------------------------------------- cost model


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


# ----------------------------------------------------------------------------- environment


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


def sfnn_backend_reasons(device: str) -> dict:
    """Provider -> None when it can run on ``device``, else the reason it cannot."""
    reasons = {p: None for p in PROVIDERS}
    try:
        import sfnn
        from sfnn import ops
    except Exception as err:  # noqa: BLE001
        return {**reasons, **{p: f"sfnn import failed: {err}" for p in SPARSE_BACKENDS}}
    if not hasattr(sfnn, "sparse_ffn"):
        return {**reasons, **{p: "sfnn.sparse_ffn does not exist" for p in SPARSE_BACKENDS}}
    for p in SPARSE_BACKENDS:
        try:
            reasons[p] = ops.backend_unavailable_reason(p, torch.device(device))
        except Exception as err:  # noqa: BLE001
            reasons[p] = f"{type(err).__name__}: {err}"
    if device == "cpu" and reasons["triton"] is None:  # TRITON_INTERPRET=1: not worth timing
        reasons["triton"] = "on the CPU only Triton's interpreter runs, which is no benchmark"
    return reasons


# ----------------------------------------------------------------------------- timing


def _quantiles(samples_ms: list) -> tuple:
    """(median, 20th percentile, 80th percentile, minimum)."""
    s = sorted(samples_ms)
    if len(s) == 1:
        return s[0], s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7], s[0]


def time_cpu(fns: dict, budget_s: float, min_reps: int = 5, max_reps: int = 50) -> dict:
    """Interleaved perf_counter timing: one warm-up call each, then rounds in which every
    provider runs once (the order rotated each round), until ``min_reps`` rounds and
    ``budget_s`` seconds (or ``max_reps``). Returns name -> (median, p20, p80, min, reps) in
    ms, reps being the number of timed rounds."""
    names = list(fns)
    round_s = 0.0
    for n in names:
        t0 = time.perf_counter()
        fns[n]()
        round_s += time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s // max(round_s, 1e-9))))
    samples = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
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


# ----------------------------------------------------------------------------- ceilings


@dataclasses.dataclass
class Ceilings:
    tflops: dict  # dtype name -> TFLOP/s
    gbs: float
    source: str

    def describe(self) -> str:
        fl = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in self.tflops.items())
        return f"{fl}; {self.gbs:.4g} GB/s ({self.source})"


def measure_ceilings(device: str, dtypes: list, how: str, small: bool = False) -> Ceilings:
    """A big matmul per dtype and a big copy, timed like the cases (the fastest run: a ceiling
    is what the machine can do); VERIFYING.md's H200
    numbers when ``how == "h200"`` or a measurement fails. ``small``: quarter-size, for smoke."""
    if how == "h200":
        return Ceilings({d: H200_TFLOPS.get(d, 790.0) for d in dtypes}, H200_GBS,
                        "H200 ceilings from shared/VERIFYING.md")
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
        src = torch.empty(copy_elems, device=device)
        dst = torch.empty_like(src)

        def cp(src=src, dst=dst):
            dst.copy_(src)

        best = timer({"copy": cp}, budget_s=1.0, min_reps=3, max_reps=10)["copy"][3]
        gbs = 2 * copy_elems * 4 / (best * 1e-3) / 1e9
        parts.append(f"{copy_elems * 4 // 2**20} MiB copy")
        del src, dst
    except Exception:  # noqa: BLE001
        gbs = H200_GBS
        parts.append("bandwidth from VERIFYING.md")
    return Ceilings(tflops, gbs, ", ".join(parts))


# ----------------------------------------------------------------------------- providers


class Problem:
    """The tensors of one case: a dense FFN (fc1, fc2) and the same weights in sfnn's layout."""

    def __init__(self, case: Case, device: str, seed: int = 0):
        torch.manual_seed(seed)
        dt = getattr(torch, case.dtype)
        d, d_ff = case.d_model, case.d_ff
        self.case, self.device = case, device
        self.fc1 = nn.Linear(d, d_ff, device=device, dtype=dt)
        self.fc2 = nn.Linear(d_ff, d, device=device, dtype=dt)
        act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[case.activation]
        self.dense = nn.Sequential(self.fc1, act, self.fc2)
        self.keys = self.fc1.weight.detach().clone()
        self.key_bias = self.fc1.bias.detach().clone()
        self.values = self.fc2.weight.detach().t().contiguous()
        self.out_bias = self.fc2.bias.detach().clone()
        self.x = torch.randn(case.tokens, d, device=device, dtype=dt)
        self.dy = torch.randn(case.tokens, d, device=device, dtype=dt)
        from sfnn.reference import block_means_ref, select_blocks_ref

        self.kbar, self.bbar = block_means_ref(self.keys, self.key_bias, case.block_size)
        self.indices = select_blocks_ref(self.x, self.kbar, self.bbar, case.top_k)
        self.distinct_blocks = int(torch.unique(self.indices).numel())
        training = case.mode != "decode"
        for p in (self.keys, self.key_bias, self.values, self.out_bias, self.x):
            p.requires_grad_(training)
        for p in self.dense.parameters():
            p.requires_grad_(training)

    def sparse_params(self) -> list:
        return [self.x, self.keys, self.values, self.key_bias, self.out_bias]

    def dense_params(self) -> list:
        return [self.x, *self.dense.parameters()]


def _forward_fn(provider: str, pb: Problem) -> tuple:
    """(x -> y, tensors whose .grad to reset) of one provider."""
    c = pb.case
    kw = dict(key_bias=pb.key_bias, out_bias=pb.out_bias, activation=c.activation)
    if provider == "dense":
        return pb.dense, pb.dense_params()
    if provider == "naive":
        from sfnn.reference import sparse_ffn_ref

        def naive(x):
            return sparse_ffn_ref(x, pb.keys, pb.values, block_size=c.block_size,
                                  top_k=c.top_k, **kw)

        return naive, pb.sparse_params()
    if provider == "gather":
        need = 2 * c.tokens * c.top_k * c.block_size * c.d_model * ELEMENT_SIZE[c.dtype]
        if need > GATHER_MAX_BYTES:
            raise MemoryError(f"gathered weights would take {need / 2**20:.0f} MiB")
        from sfnn._activations import apply_activation
        from sfnn.reference import select_blocks_ref

        offsets = torch.arange(c.block_size, device=pb.device)

        def gather(x):
            idx = select_blocks_ref(x, pb.kbar, pb.bbar, c.top_k).long()
            cells = (idx[:, :, None] * c.block_size + offsets).reshape(x.shape[0], -1)
            a = torch.bmm(pb.keys[cells], x[:, :, None]).squeeze(-1) + pb.key_bias[cells]
            h = apply_activation(a, c.activation)
            return torch.bmm(h[:, None, :], pb.values[cells]).squeeze(1) + pb.out_bias

        return gather, pb.sparse_params()
    import sfnn

    if provider == "cuda" and c.mode != "decode":
        raise NotImplementedError("backend='cuda' is forward-only: decode mode only")
    # sfnn caches kbar per keys tensor until its version counter changes. A training step
    # changes the weights, so in training modes the version is bumped before every call and the
    # block means are recomputed, as after an optimizer step; decoding keeps the cache.
    stale = [pb.keys, pb.key_bias] if c.mode in ("forward", "forward+backward") else []

    def sparse(x):
        for t in stale:
            torch.autograd.graph.increment_version(t)
        return sfnn.sparse_ffn(x, pb.keys, pb.values, block_size=c.block_size, top_k=c.top_k,
                               backend=provider, **kw)

    return sparse, pb.sparse_params()


def make_runner(provider: str, pb: Problem) -> tuple:
    """(the timed zero-argument callable for the case's mode, forward output for checking)."""
    f, params = _forward_fn(provider, pb)
    x, dy, device = pb.x, pb.dy, pb.device

    def clear():
        for p in params:
            p.grad = None

    mode = pb.case.mode
    if mode == "decode":
        with torch.no_grad():
            y0 = f(x)

        def run():
            with torch.no_grad():
                f(x)

    elif mode == "forward":
        y0 = f(x)

        def run():
            f(x)

    elif mode == "backward":
        y0 = f(x)
        y0.backward(dy, retain_graph=True)  # a first backward proves it works

        def run():
            clear()
            y0.backward(dy, retain_graph=True)

    else:
        y0 = f(x)
        y0.backward(dy)

        def run():
            clear()
            f(x).backward(dy)

    clear()
    sync(device)
    return run, y0.detach()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- the sweep

FIELDS = [
    "date", "device", "device_name", "torch", "triton", "sfnn_commit", "preset", "threads",
    "omp_wait_policy",
    "tag", "mode", "provider", "dtype", "activation", "tokens", "d_model", "d_ff", "block_size",
    "top_k", "n_blocks", "density", "distinct_blocks", "ms", "ms_p20", "ms_p80", "ms_min", "reps",
    "useful_tflops", "provider_tflops", "gbs", "speedup_vs_dense", "peak_mem_mb", "floor_ms",
    "frac_of_floor", "floor_flops", "floor_bytes", "ceiling_tflops", "ceiling_gbs",
    "ceiling_source", "rel_err", "check", "load_1m",
]


def run_case(case: Case, device: str, ceilings: Ceilings, reasons: dict, budget_s: float,
             meta: dict, log: Callable, notes: list) -> list:
    """Time every runnable provider of ``case``; return its CSV rows (dicts). A provider that
    fails on the case is left out, with a line in ``notes``."""
    case.validate()
    pb = Problem(case, device)
    runners, outputs = {}, {}
    for prov in case.providers:
        if reasons.get(prov) or (prov == "cuda" and case.mode != "decode"):  # forward-only
            continue
        try:
            runners[prov], outputs[prov] = make_runner(prov, pb)
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
                                 activation=case.activation)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    times = TIMERS[device](runners, budget_s, min_reps=case.min_reps)
    mem = {p: PEAK_MEMORY[device](fn) for p, fn in runners.items()}
    costs = cost_model(case, pb.distinct_blocks)
    peak_fl = ceilings.tflops.get(case.dtype, next(iter(ceilings.tflops.values())))
    floor_s = max(costs["floor_flops"] / (peak_fl * 1e12),
                  costs["floor_bytes"] / (ceilings.gbs * 1e9))
    dense_ms = times["dense"][0] if "dense" in times else None
    rows = []
    for prov, (med, p20, p80, low, reps) in times.items():
        sec = med * 1e-3
        prov_flops = costs["dense_flops"] if prov in ("dense", "naive") else costs["floor_flops"]
        rel = check = ""
        if ref is not None and prov != "dense":
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
            "floor_flops": costs["floor_flops"], "floor_bytes": costs["floor_bytes"],
            "ceiling_tflops": peak_fl, "ceiling_gbs": ceilings.gbs,
            "ceiling_source": ceilings.source, "rel_err": rel, "check": check,
            "load_1m": load,
        })
    return rows


def fmt(v, digits=3) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return f"{v:g}"
        return f"{v:.{digits}g}" if abs(v) < 10**digits else f"{v:.0f}"
    return str(v)


def density_label(rho: float) -> str:
    inv = 1 / rho
    return f"1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{rho:.3g}"


def acceptance_summary(rows: list) -> list:
    """Lines giving torch-vs-dense at the acceptance shape against its targets."""
    lines = []
    for mode, target in ACCEPTANCE_TARGETS.items():
        hit = [r for r in rows if r["tag"] == "acceptance" and r["mode"] == mode
               and r["provider"] == "torch" and r["speedup_vs_dense"] != ""]
        if hit:
            s = float(hit[0]["speedup_vs_dense"])
            dense = [r for r in rows if r["tag"] == "acceptance" and r["mode"] == mode
                     and r["provider"] == "dense"]
            best = float(dense[0]["ms_min"]) / float(hit[0]["ms_min"])
            lines.append(
                f"{mode}: torch {float(hit[0]['ms']):.1f} ms vs dense "
                f"{float(dense[0]['ms']):.1f} ms = {s:.2f}x (target >= {target}x: "
                f"{'PASS' if s >= target else 'FAIL'}; fastest runs: {best:.2f}x)")
    if lines:
        a = ACCEPTANCE
        head = (f"ACCEPTANCE T={a['tokens']} d_model={a['d_model']} d_ff={a['d_ff']} "
                f"block_size={a['block_size']} top_k={a['top_k']} {a['dtype']} {a['activation']}"
                f" threads={rows[0]['threads']}")
        lines.insert(0, head)
    return lines


def write_csv(rows: list, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_markdown(rows: list, path: str, meta: dict, ceilings: Ceilings, notes: list) -> None:
    out = [f"# sfnn benchmark: {meta['device_name']}", ""]
    cpu = (f" | threads {meta['threads']} | OMP_WAIT_POLICY "
           f"{meta['omp_wait_policy'] or 'unset'} | load average at start {meta['load']}"
           if meta["device"] == "cpu" else "")
    out.append(f"{meta['date']} | preset `{meta['preset']}` | torch {meta['torch']} | "
               f"triton {meta['triton']} | sfnn {meta['sfnn_commit']}{cpu}")
    out.append("")
    out.append(f"Ceilings: {ceilings.describe()}.")
    out.append("")
    acc = acceptance_summary(rows)
    if acc:
        out += ["**" + acc[0] + "**", ""] + [f"- {line}" for line in acc[1:]] + [""]
    out.append("| mode | provider | dtype | T | d_model | d_ff | g | top_k | density | ms (p20-p80)"
               " | useful TFLOP/s | GB/s | x dense | floor ms | % floor | peak MiB | check |")
    out.append("|" + "---|" * 17)
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['provider']} | {r['dtype']} | {r['tokens']} | {r['d_model']} | "
            f"{r['d_ff']} | {r['block_size']} | {r['top_k']} | {density_label(r['density'])} | "
            f"{fmt(r['ms'])} ({fmt(r['ms_p20'])}-{fmt(r['ms_p80'])}) | "
            f"{fmt(r['useful_tflops'])} | {fmt(r['gbs'])} | "
            f"{fmt(r['speedup_vs_dense']) if r['speedup_vs_dense'] != '' else '-'} | "
            f"{fmt(r['floor_ms'])} | {100 * r['frac_of_floor']:.1f} | {fmt(r['peak_mem_mb'])} | "
            f"{r['check'] or '-'} |")
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _main_shape(rows: list):
    shapes = collections.Counter((r["tokens"], r["d_model"], r["d_ff"], r["dtype"],
                                  r["activation"]) for r in rows)
    return shapes.most_common(1)[0][0] if shapes else None


PROVIDER_STYLE = {"torch": {"ls": "-", "marker": "o"}, "triton": {"ls": "-", "marker": "D"},
                  "cuda": {"ls": "--", "marker": "v"}, "naive": {"ls": ":", "marker": "s"},
                  "gather": {"ls": "-.", "marker": "^"}}


def _plot_series(rows: list, mode: str, x_key: str, series_key: str) -> tuple:
    """(shape, {(provider, series value): {x: speedup}}) of one mode at its most common shape,
    keeping only lines with at least two points."""
    mrows = [r for r in rows if r["mode"] == mode]
    shape = _main_shape(mrows)
    series = collections.defaultdict(dict)
    for r in mrows:
        if (r["tokens"], r["d_model"], r["d_ff"], r["dtype"], r["activation"]) == shape:
            # The first row of a point wins: a preset's main rows come first.
            series[(r["provider"], r[series_key])].setdefault(r[x_key],
                                                               float(r["speedup_vs_dense"]))
    return shape, {k: v for k, v in series.items() if len(v) >= 2}


def plot_speedup(rows: list, path: str, x_key: str, series_key: str, title: str) -> None:
    """Speedup over dense against ``x_key``: one panel per mode that has a line, at the mode's
    most common shape; one line per (provider, ``series_key``) with at least two points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sparse = [r for r in rows if r["provider"] != "dense" and r["speedup_vs_dense"] != ""]
    panels = [(m, *_plot_series(sparse, m, x_key, series_key)) for m in MODES]
    panels = [p for p in panels if p[2]] or [("no data", None, {})]
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.6 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (mode, shape, series) in zip(axes.flat, panels, strict=False):
        xs_all = sorted({x for pts in series.values() for x in pts})
        values = sorted({s for _, s in series})
        for (prov, s), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            xs = sorted(pts)
            label = f"{prov}, " + (f"g={s}" if series_key == "block_size"
                                   else f"density {density_label(s)}")
            # Colour = the series value (g or density), line style and marker = the provider.
            ax.plot(xs, [pts[x] for x in xs], label=label, color=f"C{values.index(s)}",
                    **PROVIDER_STYLE.get(prov, {"ls": "-", "marker": "o"}))
        if not series:
            ax.text(0.5, 0.5, "no line with two or more points in this sweep",
                    transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.axhline(1.0, color="grey", lw=1, ls=":", label="dense = 1x")
        if x_key == "density" and xs_all:
            ax.plot(xs_all, [1 / x for x in xs_all], "k--", lw=1, label="1/density (FLOP limit)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        if xs_all:
            ax.set_xticks(xs_all, [density_label(x) if x_key == "density" else str(x)
                                   for x in xs_all])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("density top_k*g/d_ff" if x_key == "density" else "block size g")
        ax.set_ylabel("speedup over dense (higher is better)")
        sub = (f"T={shape[0]} d_model={shape[1]} d_ff={shape[2]} {shape[3]} {shape[4]}"
               if shape else "")
        ax.set_title(f"{mode}: {sub}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Interrupted(Exception):
    """SIGTERM arrived during the sweep."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/<preset>)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU seconds of timed rounds per case (default by preset)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new case after this many minutes; write what was measured "
                         "(default on the CPU: 3.5 for default, 1.75 for quick; 'inf': none)")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--ceilings", choices=("measured", "h200"), default="measured")
    ap.add_argument("--providers", default=None,
                    help="comma-separated subset of providers to keep")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                       args.preset)
    os.makedirs(out_dir, exist_ok=True)
    cases = PRESETS[args.preset](device)
    if args.providers:
        keep = set(args.providers.split(","))
        cases = [dataclasses.replace(c, providers=tuple(p for p in c.providers if p in keep))
                 for c in cases]
    if args.limit is not None:
        cases = cases[:args.limit]
    for c in cases:
        c.validate()
    if args.max_minutes is None and device == "cpu":
        args.max_minutes = CPU_MAX_MINUTES.get(args.preset)
    budget = args.budget if args.budget is not None else {
        "smoke": 0.05, "quick": 2.0, "default": 4.0, "full": 2.0}[args.preset]

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "device_name": device_name(device), "torch": torch.__version__,
            "triton": triton_version(), "sfnn_commit": git_commit(), "preset": args.preset,
            "threads": torch.get_num_threads() if device == "cpu" else "",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "") if device == "cpu" else "",
            "load": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"}
    reasons = sfnn_backend_reasons(device)
    print(f"sfnn sweep: preset={args.preset} device={device} ({meta['device_name']}) "
          f"torch={meta['torch']} triton={meta['triton']} sfnn={meta['sfnn_commit']} "
          f"cases={len(cases)} load={meta['load']}", flush=True)
    for p in sorted({p for c in cases for p in c.providers}):
        if reasons.get(p):
            print(f"provider {p}: not run ({reasons[p]})", flush=True)
    t_start = time.perf_counter()
    ceilings = measure_ceilings(device, sorted({c.dtype for c in cases}), args.ceilings,
                                small=args.preset == "smoke")
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
        if args.max_minutes is not None and time.perf_counter() - t_start > 60 * args.max_minutes:
            notes.append(f"stopped after {i} of {len(cases)} cases: --max-minutes "
                         f"{args.max_minutes} reached")
            log(notes[-1])
            break
        label = (f"[{i + 1}/{len(cases)}] {case.mode} T={case.tokens} d={case.d_model} "
                 f"d_ff={case.d_ff} g={case.block_size} k={case.top_k} "
                 f"({density_label(case.density)}) {case.dtype} {case.activation}")
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
        if case.tag == "acceptance" and (i + 1 == len(cases) or cases[i + 1].tag != "acceptance"):
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
    if device == "cpu" and loads and max(loads) > args.threads + 1:
        notes.insert(0, f"the 1-minute load average reached {max(loads):.1f} on "
                        f"{os.cpu_count()} cores (threads={args.threads}): other processes "
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


if __name__ == "__main__":
    sys.exit(main())
