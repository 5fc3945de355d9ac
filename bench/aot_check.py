"""Compile every Triton kernel config ahead of time for sm_80 and sm_90, without a GPU.

Takes every spec of ``sfnn.triton_kernels._aot.specs()`` (signatures derived from the kernels'
own parameter lists), compiles each with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and reads from each
cubin, with the ``cuobjdump`` shipped in the triton wheel, the registers and the stack/local
bytes (spills); shared memory comes from the compile metadata and is checked against the arch's
per-block limit. Specs marked ``is_gemm`` must show ``HGMMA`` (Hopper's warpgroup MMA) in their
sm_90 SASS. Prints a table, then the 128-row block-FFN configs in bf16 at block sizes 64 and 128
(registers, shared memory and resident CTAs per SM on each arch), then exactly one summary
line::

    aot: N kernel configs compiled for sm_80 and sm_90; spills: S; hgmma: H/G gemm kernels

and exits 1 if any compile fails, any config spills or exceeds shared memory, or a gemm config
lacks HGMMA on sm_90. Compilation hints mimic what the JIT specialises on real tensors: every
pointer is 16-byte aligned, and integer arguments named ``stride_*``, ``d_model`` or ``slice_d``
(a multiple of the widest BLOCK_D) are multiples of 16. Works with triton 3.6 and 3.9
(ASTSource's ``constexprs``/``attrs`` arguments; older releases took ``constants`` keyed by
index, handled best-effort).

Usage: python bench/aot_check.py [--jobs N] [--filter SUBSTR] [--archs 80,90] [--fresh-cache]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import inspect
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

# Per-block shared memory limits (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Per-SM resources for the occupancy column: shared memory (bytes; 1 KB reserved per block),
# 64K registers (allocated per warp in units of 256), 2048 threads, 32 blocks.
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
HINTED_INTS = re.compile(r"^(stride_.*|d_model|slice_d)$")

_SPECS: list = []  # filled before the worker pool forks


def _discover_specs(name_filter: str | None) -> list:
    from sfnn.triton_kernels import _aot

    return [s for s in _aot.specs() if name_filter is None or name_filter in s.name]


def ctas_per_sm(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Resident CTAs per SM that registers, shared memory and threads allow."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (per_warp * num_warps)
    by_smem = SMEM_PER_SM.get(arch, SMEM_PER_SM[80]) // (smem + 1024)
    return max(0, min(by_regs, by_smem, 2048 // (32 * num_warps), 32))


def occupancy_report(rows: list, specs: list) -> list:
    """Lines of the 128-row bf16 block-FFN configs at block sizes 64 and 128."""
    by_key = {(r["idx"], r["arch"]): r for r in rows if r["ok"]}
    lines = ["128-row bf16 block-FFN configs at g=64 and g=128 "
             "(regs / shared bytes / CTAs per SM):",
             f"{'kernel config':<72} {'sm_80':>22} {'sm_90':>22}"]
    for i, spec in enumerate(specs):
        if not (spec.kernel_name.startswith("block_ffn") and spec.dtype == "bf16"
                and spec.rows >= 128 and spec.block_size in (64, 128)):
            continue
        cells = []
        for arch in (80, 90):
            r = by_key.get((i, arch))
            cells.append("-" if r is None else
                         f"{r['regs']} / {r['smem']} / "
                         f"{ctas_per_sm(r['regs'], r['smem'], spec.num_warps, arch)}")
        lines.append(f"{spec.name:<72} {cells[0]:>22} {cells[1]:>22}")
    return lines


def _make_source(kernel, signature: dict, constexprs: dict, attrs: dict):
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:  # triton >= 3.2 (3.6, 3.9): names, "constexpr" in the signature
        sig = {name: ("constexpr" if name in constexprs else ty) for name, ty in signature.items()}
        return ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    # Older releases: constants keyed by argument index, signature without constexprs.
    names = kernel.arg_names
    sig = {names.index(n): ty for n, ty in signature.items() if n not in constexprs}
    constants = {names.index(n): v for n, v in constexprs.items()}
    return ASTSource(fn=kernel, signature=sig, constants=constants)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin_path: str) -> dict:
    out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key] = int(m.group(1)) if m else -1
    return usage


def _compile_one(job: tuple[int, int]) -> dict:
    """Compile spec ``idx`` for ``arch``; return a row of plain values (runs in a worker)."""
    idx, arch = job
    spec = _SPECS[idx]
    row = {"idx": idx, "name": spec.name, "arch": arch, "is_gemm": spec.is_gemm, "ok": False}
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        kernel = spec.kernel
        attrs = {}
        for i, name in enumerate(kernel.arg_names):
            ty = spec.signature.get(name, "constexpr")
            if name in spec.constexprs:
                continue
            if ty.startswith("*") or (ty.startswith("i") and HINTED_INTS.match(name)):
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = _make_source(kernel, spec.signature, spec.constexprs, attrs)
        target = GPUTarget("cuda", arch, 32)
        backend = triton.compiler.make_backend(target)
        opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        if spec.maxnreg:  # a register limit, where the config sets one
            opts["maxnreg"] = spec.maxnreg
        options = backend.parse_options(opts)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = _resource_usage(path)
            sass = ""
            if spec.is_gemm:
                sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path],
                                      capture_output=True, text=True, check=True).stdout
        row.update(
            ok=True,
            regs=usage["REG"],
            spill=max(usage["STACK"], 0) + max(usage["LOCAL"], 0),
            smem=int(compiled.metadata.shared),
            hgmma=sass.count("HGMMA"),
            hmma=sass.count("HMMA"),
        )
    except Exception as err:  # report and keep going: the summary counts failures
        row["error"] = f"{type(err).__name__}: {err}"
        row["trace"] = traceback.format_exc()
    row["secs"] = time.time() - t0
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compile processes (default: all cores)")
    parser.add_argument("--filter", default=None, help="only specs whose name contains this")
    parser.add_argument("--archs", default="80,90", help="comma-separated SM versions")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="compile into an empty TRITON_CACHE_DIR (honest timings)")
    args = parser.parse_args(argv)

    if args.fresh_cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_cache_")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice
    import triton

    archs = [int(a) for a in args.archs.split(",")]
    t_start = time.time()
    _SPECS[:] = _discover_specs(args.filter)
    jobs = [(i, arch) for i in range(len(_SPECS)) for arch in archs]
    print(f"triton {triton.__version__}: {len(_SPECS)} specs x {len(archs)} archs, "
          f"{args.jobs} jobs", flush=True)
    header = (f"{'kernel config':<72} {'sm':>3} {'regs':>5} {'spill':>6} {'smem':>7} "
              f"{'mma':>10} {'s':>5}")
    print(header)
    print("-" * len(header), flush=True)
    counts = {"failures": 0, "spills": 0, "smem_over": 0}
    rows = []

    def report(row):  # one line per compile, as it finishes, so a slow run shows progress
        rows.append(row)
        if not row["ok"]:
            counts["failures"] += 1
            print(f"{row['name']:<72} {row['arch']:>3} FAILED: {row['error'][:300]}", flush=True)
            print(row["trace"], file=sys.stderr)
            return
        counts["spills"] += row["spill"] > 0
        over = row["smem"] > SMEM_LIMIT.get(row["arch"], SMEM_LIMIT[80])
        counts["smem_over"] += over
        mma = "-"
        if row["is_gemm"]:
            mma = f"HGMMA:{row['hgmma']}" if row["hgmma"] else f"HMMA:{row['hmma']}"
        flags = (" SPILL" if row["spill"] else "") + (" SMEM>LIMIT" if over else "")
        print(f"{row['name']:<72} {row['arch']:>3} {row['regs']:>5} {row['spill']:>6} "
              f"{row['smem']:>7} {mma:>10} {row['secs']:>5.1f}{flags}", flush=True)

    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
            for row in pool.map(_compile_one, jobs):
                report(row)
    else:
        for job in jobs:
            report(_compile_one(job))
    failures, spills, smem_over = counts["failures"], counts["spills"], counts["smem_over"]

    for line in occupancy_report(rows, _SPECS):
        print(line)
    gemm_rows = [r for r in rows if r["is_gemm"] and r["arch"] == 90]
    hgmma_ok = sum(1 for r in gemm_rows if r["ok"] and r["hgmma"] > 0)
    missing = [r["name"] for r in gemm_rows if r["ok"] and r["hgmma"] == 0]
    for name in missing:
        print(f"no HGMMA on sm_90: {name}")
    print(f"failures: {failures}; over shared-memory limit: {smem_over}; "
          f"wall {time.time() - t_start:.0f}s")
    arch_words = " and ".join(f"sm_{a}" for a in archs)
    print(f"aot: {len(_SPECS)} kernel configs compiled for {arch_words}; spills: {spills}; "
          f"hgmma: {hgmma_ok}/{len(gemm_rows)} gemm kernels")
    bad = failures or spills or smem_over or missing
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
