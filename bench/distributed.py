#!/usr/bin/env python
"""Block parallelism at scale, on paper, and the gloo version on this machine.

    python bench/distributed.py model [--d-model 4096] [--tflops 790] [--gemm-efficiency 0.5]
        [--nvlink-gbs 450] [--ib-gbs 50] [--link-efficiency 0.8] [--gpus-per-node 8]
    python bench/distributed.py gloo [--worlds 1 2 4] [--tokens 1024] [--iters 10]

``model`` prints a markdown table: for a block-parallel layer
(:class:`sfnn.distributed.BlockParallelSparseFFN`) on 8 to 64 GPUs, the bytes each token sends
per layer against the GEMM work it brings, and whether the all_to_all can hide behind the
layer's own GEMMs, over an NVLink domain and over 8-GPU NVLink nodes joined by InfiniBand.

``gloo`` runs the layer on the CPU with the gloo backend at world sizes 1, 2 and 4, all ranks on
this machine's cores, and prints tokens/s beside one process running SparseFFN. It is a
functional check of the distributed path (it runs, and where its time goes), not a speed claim:
the ranks share the same few cores, so more ranks cannot be faster here.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

# ----------------------------------------------------------------------------- the cost model


def owner_probability(n_blocks: int, world: int, top_k: int) -> float:
    """P(a given rank owns at least one of a token's top_k blocks), blocks drawn uniformly
    without replacement, each rank owning n_blocks / world contiguous blocks."""
    n_local = n_blocks // world
    none = 1.0
    for i in range(top_k):
        if n_blocks - n_local - i <= 0:
            return 1.0
        none *= (n_blocks - n_local - i) / (n_blocks - i)
    return 1.0 - none


def layer_costs(*, d_model: int, block_size: int, top_k: int, n_blocks: int, world: int,
                gpus_per_node: int, dtype_bytes: int = 2, tokens_per_gpu: int = 8192) -> dict:
    """Per token of a source rank, per layer, under uniform routing (Avg-K needs no balancing
    loss and routes near-uniformly; a skewed routing loads some owners more, which this mean
    does not show). Rows: a token's row goes once to every other rank owning one of its blocks
    (sfnn sends one row per (token, owner), not one per (token, block)); a row to the token's
    own rank stays in memory."""
    p = owner_probability(n_blocks, world, top_k)
    rows_remote = (world - 1) * p
    rows_intra = (min(world, gpus_per_node) - 1) * p
    rows_inter = max(world - gpus_per_node, 0) * p
    pairs_remote = top_k * (world - 1) / world
    row_bytes = d_model * dtype_bytes
    # Forward: rows out, partial outputs back, and an int64 code per remote (token, block) pair.
    fwd_bytes = 2 * rows_remote * row_bytes + 8 * pairs_remote
    # Training adds the backward (dy rows out, dx rows back) and the kbar all-gather per call
    # (n_blocks x (d_model + 1) float32, of which (world - 1) / world arrives), per token.
    kbar_bytes = n_blocks * (d_model + 1) * 4 * (world - 1) / world / tokens_per_gpu
    kbar_intra = kbar_bytes * (min(world, gpus_per_node) - 1) / (world - 1) if world > 1 else 0.0
    train_bytes = 4 * rows_remote * row_bytes + 8 * pairs_remote + kbar_bytes
    return {
        "rows_remote": rows_remote, "rows_intra": rows_intra, "rows_inter": rows_inter,
        "pairs_remote": pairs_remote, "fwd_bytes": fwd_bytes, "train_bytes": train_bytes,
        "fwd_bytes_no_sharing": 2 * pairs_remote * row_bytes + 8 * pairs_remote,
        "kbar_bytes": kbar_bytes, "kbar_intra": kbar_intra,
        "fwd_flops": 4 * d_model * top_k * block_size,
        "train_flops": 12 * d_model * top_k * block_size,
        "row_bytes": row_bytes,
    }


def comm_seconds(c: dict, rows_key_scale: float, *, nvlink: float, ib: float | None) -> float:
    """Seconds per token for ``rows_key_scale`` row transfers each way (2 in the forward, 4 in
    training): NVLink and InfiniBand run at once (full duplex: sending and receiving overlap), so
    the slower of the two sets the time. ``ib=None``: every rank is on NVLink."""
    row = c["row_bytes"] * rows_key_scale
    if ib is None:
        return c["rows_remote"] * row / nvlink
    return max(c["rows_intra"] * row / nvlink, c["rows_inter"] * row / ib)


def kbar_seconds(c: dict, *, nvlink: float, ib: float) -> float:
    """Seconds per token of the training call's kbar all-gather (its share from the node's own
    GPUs over NVLink, the rest over InfiniBand, at once)."""
    return max(c["kbar_intra"] / nvlink, (c["kbar_bytes"] - c["kbar_intra"]) / ib)


MODEL_CONFIGS = [  # (block_size, top_k, n_blocks): active cells top_k * block_size
    (64, 32, 4096),   # the paper's regime: small blocks, d_ff = 262,144
    (256, 8, 1024),   # the same 2,048 active cells in coarse blocks
    (1024, 8, 256),   # MoE-sized experts: 8,192 active cells
]


def model_table(args) -> str:
    flops = args.tflops * 1e12 * args.gemm_efficiency
    nvl = args.nvlink_gbs * 1e9 * args.link_efficiency
    ib = args.ib_gbs * 1e9 * args.link_efficiency
    b = 2
    lines = [
        f"Per token, per layer, forward unless marked; d_model={args.d_model}, bf16 rows, "
        f"uniform routing. GEMMs at {flops / 1e12:.0f} TFLOP/s ({args.gemm_efficiency:g} of "
        f"{args.tflops:g}); NVLink {nvl / 1e9:.0f} GB/s and InfiniBand {ib / 1e9:.0f} GB/s per "
        f"GPU per direction ({args.link_efficiency:g} of {args.nvlink_gbs:g} and "
        f"{args.ib_gbs:g}); 'nodes + IB': {args.gpus_per_node}-GPU NVLink nodes. a2a/GEMM <= 1: "
        "the all_to_all can hide behind the layer's GEMMs (given chunks to overlap).",
        "",
        "| g | top_k | n_blocks | GPUs | rows sent (pairs) | KB sent | GEMM MFLOP | GEMM ns | "
        "a2a ns, NVLink | a2a/GEMM, NVLink | a2a ns, nodes + IB | a2a/GEMM, nodes + IB | "
        "a2a/GEMM training, nodes + IB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, k, n in MODEL_CONFIGS:
        for world in (8, 16, 32, 64):
            c = layer_costs(d_model=args.d_model, block_size=g, top_k=k, n_blocks=n,
                            world=world, gpus_per_node=args.gpus_per_node, dtype_bytes=b,
                            tokens_per_gpu=args.tokens_per_gpu)
            t_gemm = c["fwd_flops"] / flops
            t_nvl = comm_seconds(c, 2, nvlink=nvl, ib=None)
            t_ib = comm_seconds(c, 2, nvlink=nvl, ib=ib)
            t_train_ib = comm_seconds(c, 4, nvlink=nvl, ib=ib) + kbar_seconds(c, nvlink=nvl,
                                                                              ib=ib)
            lines.append(
                f"| {g} | {k} | {n} | {world} | {c['rows_remote']:.1f} ({c['pairs_remote']:.1f})"
                f" | {c['fwd_bytes'] / 1e3:.0f} | {c['fwd_flops'] / 1e6:.1f} | "
                f"{t_gemm * 1e9:.0f} | {t_nvl * 1e9:.0f} | {t_nvl / t_gemm:.1f} | "
                f"{t_ib * 1e9:.0f} | {t_ib / t_gemm:.1f} | "
                f"{t_train_ib / (c['train_flops'] / flops):.1f} |")
    need_nvl = flops * b / (2 * nvl)
    need_ib = flops * b / (2 * ib)
    lines += [
        "",
        f"The forward ratio is `rows * bytes_per_element * F / (2 * top_k * g * BW)`: d_model "
        f"cancels. The all_to_all hides behind the GEMMs when each row sent serves at least "
        f"`F * bytes / (2 * BW)` active cells, here {need_nvl:.0f} over NVLink and "
        f"{need_ib:.0f} over InfiniBand. Training needs two thirds of that (the backward "
        f"sends rows twice, as the forward does, but brings twice the forward's GEMMs), plus "
        f"the kbar all-gather of each call ({args.tokens_per_gpu} tokens per GPU assumed).",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------- the gloo functional check


def _gloo_rank(rank, world, store, cfg, out_dir):
    import torch.distributed as dist

    import sfnn
    from sfnn import distributed as sd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    comm_time = [0.0]
    run = sd._Comm._run

    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return run(self, *a, **kw)
        finally:
            comm_time[0] += time.perf_counter() - t

    sd._Comm._run = timed
    torch.manual_seed(0)
    full = sfnn.SparseFFN(cfg["d_model"], cfg["d_ff"], block_size=cfg["block_size"],
                          top_k=cfg["top_k"], backend="torch")
    layer = sd.BlockParallelSparseFFN.from_sparse_ffn(full)
    x = torch.randn(cfg["tokens"], cfg["d_model"], generator=torch.Generator().manual_seed(rank))
    results = {}
    for mode in ("forward", "forward+backward"):
        times, comms = [], []
        for i in range(cfg["warmup"] + cfg["iters"]):
            dist.barrier()
            comm_time[0] = 0.0
            t = time.perf_counter()
            if mode == "forward":
                with torch.no_grad():
                    layer(x)
            else:
                xi = x.clone().requires_grad_()
                layer(xi).sum().backward()
            elapsed = torch.tensor([time.perf_counter() - t, comm_time[0]], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            if i >= cfg["warmup"]:
                times.append(elapsed[0].item())
                comms.append(elapsed[1].item())
        results[mode] = (statistics.median(times), statistics.median(comms))
    if rank == 0:
        with open(os.path.join(out_dir, f"w{world}.txt"), "w") as f:
            for mode, (t, c) in results.items():
                f.write(f"{mode} {t} {c}\n")
    dist.destroy_process_group()


def _single_process(cfg) -> dict:
    import sfnn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = sfnn.SparseFFN(cfg["d_model"], cfg["d_ff"], block_size=cfg["block_size"],
                           top_k=cfg["top_k"], backend="torch")
    x = torch.randn(cfg["tokens"], cfg["d_model"])
    out = {}
    for mode in ("forward", "forward+backward"):
        times = []
        for i in range(cfg["warmup"] + cfg["iters"]):
            t = time.perf_counter()
            if mode == "forward":
                with torch.no_grad():
                    layer(x)
            else:
                xi = x.clone().requires_grad_()
                layer(xi).sum().backward()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t)
        out[mode] = statistics.median(times)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def gloo_table(args) -> str:
    import torch.multiprocessing as mp

    cfg = dict(d_model=args.d_model, d_ff=args.d_ff, block_size=args.block_size,
               top_k=args.top_k, tokens=args.tokens, warmup=2, iters=args.iters)
    load_before = _loadavg()
    single = _single_process(cfg)
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_gloo_rank, args=(world, os.path.join(tmp, "store"), cfg, tmp),
                               nprocs=world, start_method="spawn")
            with open(os.path.join(tmp, f"w{world}.txt")) as f:
                for line in f:
                    mode, t, c = line.split()
                    rows.append((world, mode, float(t), float(c)))
    load_after = _loadavg()
    head = (f"**Functional check, not a speed claim.** {_cpu_name()}, {os.cpu_count()} cores "
            f"shared by all ranks (one intra-op thread per rank), "
            f"torch {torch.__version__}, gloo, float32, backend torch, "
            f"{datetime.date.today().isoformat()}; load average before {load_before}, "
            f"after {load_after}. Layer d_model={cfg['d_model']}, d_ff={cfg['d_ff']}, "
            f"g={cfg['block_size']}, top_k={cfg['top_k']}; {cfg['tokens']} tokens per rank; "
            f"median of {cfg['iters']} calls, each timed on its slowest rank.")
    lines = [head, "", "| ranks | mode | ms per call | tokens/s (all ranks) | of which in "
             "collectives | one process, SparseFFN: tokens/s |", "|---|---|---|---|---|---|"]
    for world, mode, t, c in rows:
        lines.append(f"| {world} | {mode} | {t * 1e3:.1f} | {world * cfg['tokens'] / t:,.0f} | "
                     f"{100 * c / t:.0f}% | {cfg['tokens'] / single[mode]:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="the modelled table at 8-64 GPUs")
    m.add_argument("--d-model", type=int, default=4096)
    m.add_argument("--tflops", type=float, default=790.0,
                   help="bf16 dense peak per GPU (an H200 measures about 790)")
    m.add_argument("--gemm-efficiency", type=float, default=0.5,
                   help="fraction of the peak the block GEMMs reach")
    m.add_argument("--nvlink-gbs", type=float, default=450.0,
                   help="NVLink GB/s per GPU per direction (H200 HGX: 450)")
    m.add_argument("--ib-gbs", type=float, default=50.0,
                   help="InfiniBand GB/s per GPU per direction (NDR 400 Gb/s: 50)")
    m.add_argument("--link-efficiency", type=float, default=0.8,
                   help="fraction of the link an all_to_all reaches")
    m.add_argument("--gpus-per-node", type=int, default=8)
    m.add_argument("--tokens-per-gpu", type=int, default=8192,
                   help="tokens per GPU per call, to spread the kbar all-gather over")
    g = sub.add_parser("gloo", help="tokens/s of the gloo version at world sizes 1, 2, 4")
    g.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    g.add_argument("--iters", type=int, default=10)
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--d-ff", type=int, default=8192)
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args(argv)
    if args.cmd == "model":
        print(model_table(args))
    else:
        print(gloo_table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
