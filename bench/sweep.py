#!/usr/bin/env python
"""Throughput sweep of sfnn's block-sparse FFN against the dense FFN it replaces.

    python bench/sweep.py [--preset default|quick|smoke|full|decode|gated] [--out DIR]
                          [--device cpu|cuda] [--contention N]
    python bench/sweep.py --model     # the per-phase GPU cost model of the Triton kernels

Each *case* is one problem (tokens, d_model, d_ff, block_size, top_k, dtype, activation, mode);
each *provider* is one way to compute it:

- ``dense``: ``nn.Sequential(nn.Linear(d, d_ff), act, nn.Linear(d_ff, d))``, the baseline;
- ``naive``: ``sfnn.reference.sparse_ffn_ref``, the dense-masked oracle a user would write first;
- ``gather``: per-token gathered weight rows and two batched matrix-vector products (only where
  the gathered copies fit in memory, so in practice decoding);
- ``torch`` / ``triton`` / ``cuda``: ``sfnn.sparse_ffn(..., backend=...)`` (each only where it
  can run: triton on CUDA tensors, cuda when ``sfnn.cuda_ext.available()`` and only in decode,
  as the extension is forward-only).

Gated cases (``--preset gated``, issue 11) compute ``down(act(gate(x)) * up(x))``: ``dense`` is
then the dense gated FFN and the sfnn providers get ``gate_keys=``/``gate_bias=``.

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
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sweeplib.cases import ACCEPTANCE, ELEMENT_SIZE, MODES, PRESETS, Case, grid, top_k_for  # noqa: E402,F401,I001
from sweeplib.cases import preset_default, preset_full, preset_quick, preset_smoke  # noqa: E402,F401
from sweeplib.cost import cost_model, floors  # noqa: E402,F401
from sweeplib.measure import Ceilings, measure_ceilings, time_cpu, time_cuda  # noqa: E402,F401
from sweeplib.providers import PROVIDERS, Problem, Provider, make_runner, register  # noqa: E402,F401
from sweeplib.report import FIELDS, acceptance_summary, write_csv, write_markdown  # noqa: E402,F401
from sweeplib.runner import run_case, run_sweep  # noqa: E402,F401

# The CPU presets promise a wall time (default <= 4 min, quick < 2 min on 2 cores): a slow path
# or a busy machine drops the tail cases, with a note, rather than overrunning.
CPU_MAX_MINUTES = {"default": 3.5, "quick": 1.75}
BUDGET_S = {"smoke": 0.05, "quick": 2.0, "default": 4.0, "full": 2.0, "decode": 2.0,
            "gated": 4.0}


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
    ap.add_argument("--contention", type=int, default=None, metavar="N",
                    help="time every case while N CPU-bound processes run (default: each "
                         "case's own setting, 0 but for the CPU acceptance rows marked so)")
    ap.add_argument("--model", action="store_true",
                    help="print the per-phase GPU cost model of the Triton kernels (both combine "
                         "schedules and the v1 kernels, against dense) and exit")
    args = ap.parse_args(argv)
    if args.model:
        from sweeplib.model import report

        print(report())
        return 0

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
    if args.contention is not None:
        cases = [dataclasses.replace(c, contention=args.contention) for c in cases]
    if args.limit is not None:
        cases = cases[:args.limit]
    for c in cases:
        c.validate()
    max_minutes = args.max_minutes
    if max_minutes is None and device == "cpu":
        max_minutes = CPU_MAX_MINUTES.get(args.preset)
    budget = args.budget if args.budget is not None else BUDGET_S[args.preset]
    return run_sweep(cases, device=device, out_dir=out_dir, preset=args.preset, budget=budget,
                     max_minutes=max_minutes, ceilings_how=args.ceilings, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
