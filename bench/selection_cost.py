"""What each selection method costs beside Avg-K, and what block-usage tracking costs.

At the acceptance shape (T=4096, d_model=512, d_ff=8192, g=64, top_k=16, fp32, gelu) on the
torch path by default, this times, interleaved round by round so that a loaded machine slows
every variant alike:

- the whole layer (``SparseFFN(selection=m)``, the same weights) forward and forward+backward,
  for every method, and for Avg-K with ``track_usage=True``;
- the selection step alone (``sfnn.selection.select``: Avg-K's block means and fused top-k, the
  router's logits, softmax, top-k and balancing loss, the hash lookup, the random draws).

It prints medians (ms) and each method's overhead relative to Avg-K. Wall-clock timings on a
shared CPU are noisy (the load average is printed with the table); ``--clock cpu`` measures the
process's CPU time instead (with ``--threads 1`` that is the work itself, which other
processes' load disturbs far less than the wall clock). Usage:

    python bench/selection_cost.py [--tokens 4096] [--rounds 9] [--device cpu] [--threads N]
                                   [--clock wall|cpu] [--out FILE.md]

``--out`` also writes the table, headed by the date, the machine, the versions, the sfnn commit
and the command line, to a markdown file (committed under ``bench/results/<machine>/selection/``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import sfnn
from sfnn import ops
from sfnn import selection as selection_lib


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _layers(args) -> dict:
    torch.manual_seed(0)
    kw = dict(block_size=args.block_size, top_k=args.top_k, activation="gelu",
              backend=args.backend, device=args.device)
    base = sfnn.SparseFFN(args.d_model, args.d_ff, **kw)
    layers = {}
    for method in sfnn.METHODS:
        layer = sfnn.SparseFFN(args.d_model, args.d_ff, selection=method, vocab_size=args.vocab,
                               seed=1, **kw)
        with torch.no_grad():
            for name in ("key_weight", "value_weight", "key_bias", "out_bias"):
                getattr(layer, name).copy_(getattr(base, name))
        layers[method] = layer
    tracked = sfnn.SparseFFN(args.d_model, args.d_ff, track_usage=True, **kw)
    tracked.load_state_dict(base.state_dict())
    layers["avgk+usage"] = tracked
    return layers


def _selection_step(layer, x2d, ids, backend):
    """The selection half alone, as sparse_ffn runs it (block means included for Avg-K)."""
    kbar = bbar = None
    if layer.selection == "avgk":
        kbar, bbar = sfnn.block_means(layer.key_weight, layer.key_bias,
                                      block_size=layer.block_size, backend=backend)
    seed = None
    if layer.selection == "random":
        seed = selection_lib.call_seed(layer.random_seed, layer.random_calls)
    sel = selection_lib.select(
        x2d, layer.selection, top_k=layer.top_k, n_blocks=layer.n_blocks, backend=backend,
        kbar=kbar, bbar=bbar, router_weight=layer.router_weight, token_ids=ids,
        hash_table=layer.hash_table, seed=seed, balance_loss_weight=0.01)
    if sel.gates is not None and torch.is_grad_enabled():
        (sel.gates.sum() + sel.aux_loss).backward()


def measure(args) -> dict:
    """{(variant, mode): [seconds per round]}."""
    layers = _layers(args)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.d_model, generator=gen).to(args.device)
    dy = torch.randn(args.tokens, args.d_model, generator=gen).to(args.device)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(args.device)
    backend = ops.resolve_backend(args.backend, x.device, args.tokens, True, x.dtype)
    xg = x.clone().requires_grad_()

    def layer_fwd(layer):
        with torch.no_grad():
            layer(x, token_ids=ids)

    def layer_train(layer):
        xg.grad = None
        for p in layer.parameters():
            p.grad = None
        (layer(xg, token_ids=ids) * dy).sum().add(layer.aux_loss()).backward()

    def select_fwd(layer):
        with torch.no_grad():
            _selection_step(layer, x, ids, backend)

    def select_train(layer):
        _selection_step(layer, xg, ids, backend)

    jobs = {}  # mode by mode, so that each variant runs right beside avgk in every round
    for mode, fn in (("forward", layer_fwd), ("forward+backward", layer_train),
                     ("selection forward", select_fwd), ("selection fwd+bwd", select_train)):
        for name, layer in layers.items():
            if name not in args.variants or mode not in args.modes:
                continue
            if name in sfnn.METHODS or not mode.startswith("sel"):
                jobs[(name, mode)] = (fn, layer)
    counts = torch.zeros(layers["avgk"].n_blocks, dtype=torch.int64, device=args.device)
    chosen = torch.randint(0, layers["avgk"].n_blocks, (args.tokens, args.top_k),
                           generator=gen).to(args.device)
    jobs[("usage update", "alone")] = (
        lambda _: selection_lib.accumulate_usage(counts, chosen), None)
    for fn, layer in jobs.values():  # warm up
        fn(layer)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {k: [] for k in jobs}
    for _ in range(args.rounds):
        for key, (fn, layer) in jobs.items():
            _sync(args.device)
            t0 = clock()
            fn(layer)
            _sync(args.device)
            times[key].append(clock() - t0)
    return times


VARIANTS = sfnn.METHODS + ("avgk+usage",)
MODES = ("forward", "forward+backward", "selection forward", "selection fwd+bwd")


def table(times: dict, args) -> str:
    modes = [m for m in MODES if m in args.modes]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    lines = [f"T={args.tokens}, d_model={args.d_model}, d_ff={args.d_ff}, g={args.block_size}, "
             f"top_k={args.top_k}, fp32, gelu, backend={args.backend} on {args.device}, "
             f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians of "
             f"{'CPU' if args.clock == 'cpu' else 'wall-clock'} time; "
             f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}",
             "",
             "| variant | " + " | ".join(f"{m} ms (vs avgk)" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for name in VARIANTS:
        if name not in args.variants:
            continue
        cells = []
        for m in modes:
            if (name, m) not in med or ("avgk", m) not in med:
                cells.append("")
                continue
            base = med[("avgk", m)]
            rel = "" if name == "avgk" else f" ({(med[(name, m)] - base) / base * 100:+.1f}%)"
            layer_m = "forward" if m in ("forward", "selection forward") else "forward+backward"
            if m.startswith("selection") and ("avgk", layer_m) in med:
                rel += f", {med[(name, m)] / med[('avgk', layer_m)] * 100:.1f}% of avgk layer"
            cells.append(f"{med[(name, m)]:.1f}{rel}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # Paired: each round's time over the avgk time of the same round (adjacent calls), whose
    # median shrugs off the drift a loaded machine adds between rounds.
    paired = []
    for name in VARIANTS:
        if name == "avgk" or name not in args.variants:
            continue
        cells = []
        for m in modes:
            a, b = times.get(("avgk", m)), times.get((name, m))
            if not a or not b:
                cells.append("")
                continue
            r = sorted(tb / ta - 1 for ta, tb in zip(a, b, strict=True))
            q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
            cells.append(f"{q[1] * 100:+.1f}% [{q[0] * 100:+.1f}, {q[2] * 100:+.1f}]")
        paired.append(f"| {name} | " + " | ".join(cells) + " |")
    if paired:
        lines += ["", "Paired per round (median, [quartiles]) of variant time / avgk time - 1:",
                  "", "| variant | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        lines += paired
    usage = med.get(("usage update", "alone"))
    if usage is not None and ("avgk", "forward") in med and ("avgk", "forward+backward") in med:
        lines += ["", f"usage update alone (index_add_ of T*top_k = {args.tokens * args.top_k} "
                      f"ones into {args.d_ff // args.block_size} int64 counts): {usage:.3f} ms "
                      f"= {usage / med[('avgk', 'forward')] * 100:.3f}% of the avgk forward, "
                      f"{usage / med[('avgk', 'forward+backward')] * 100:.3f}% of "
                      "forward+backward"]
    return "\n".join(lines)


def provenance(args) -> str:
    """Where and when: date, machine, versions, sfnn commit, OMP wait policy, command line."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else \
        f"{cpu} ({os.cpu_count()} logical cores)"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Selection cost beside Avg-K (bench/selection_cost.py)\n\n"
            f"{now}; {device}; python {platform.python_version()}, torch {torch.__version__}; "
            f"sfnn {commit or 'unknown'}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}"
            f"\n\n`python bench/selection_cost.py {' '.join(sys.argv[1:])}`\n")


def _subset(p, flag: str, value: str, allowed: tuple) -> set:
    chosen = {v.strip() for v in value.split(",") if v.strip()}
    bad = chosen - set(allowed)
    if bad or not chosen:
        p.error(f"{flag} takes a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock time, or the process's CPU time (CPU device only)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (avgk is always kept)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {','.join(MODES)}")
    args = p.parse_args()
    args.variants = _subset(p, "--variants", args.variants, VARIANTS) | {"avgk"}
    args.modes = _subset(p, "--modes", args.modes, MODES)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures the process's CPU time: CPU device only")
    if args.threads:
        torch.set_num_threads(args.threads)
    text = table(measure(args), args)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(provenance(args) + "\n" + text + "\n")


if __name__ == "__main__":
    main()
