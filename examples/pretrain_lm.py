"""The paper's experiment with sfnn: pretrain small GPT-style LMs whose FFNs are dense, Avg-K,
Switch, top-k MoE, HashLayer or random, all at the same number of active cells per token.

    python examples/pretrain_lm.py --preset cpu --seeds 0 1 2 --jobs 4  # ~1 h, 2 cores
    python examples/pretrain_lm.py --preset gpu                         # minutes on one H200
    python examples/pretrain_lm.py --preset cpu --variants dense avgk-16 avgk-64 switch

Everything but the FFN is the same for every variant: the model (``lm_model.py``), the data and
its order (the Python standard library's sources, ``lm_data.py``), the optimizer and schedule
(AdamW, warm-up then cosine), the seeds. Switch and MoE add the Switch balancing loss with the
coefficient ``--aux-coef`` (0.01, the same for both; the other methods have none).

Per variant and seed the run reports validation and test perplexity, training tokens/s, forward
FLOPs per token, and block usage over the final validation pass (dead blocks, load CV, from
``SparseFFN.usage_stats()``). It writes into ``--out`` (``examples/results/<preset>``):
``runs.csv`` (one row per run), ``curves.csv`` (validation loss against steps), ``results.md``
(mean +- std over seeds), ``val_loss.png`` and ``meta.json`` (config, corpus, machine).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_data  # noqa: E402
from lm_model import GATED, GPT, ModelConfig, fwd_flops_per_token, parse_variant  # noqa: E402

import sfnn  # noqa: E402

# `block_size` is the block size of avgk and random named without one; switch and hash get
# one block of `active` cells (top-1), moe two of `active / 2` (lm_model.default_block_size).
PRESETS = {
    "tiny": dict(  # the test's: seconds
        d_model=32, n_layers=2, n_heads=2, seq_len=32, active=64, expansion=2, block_size=16,
        batch_size=4, steps=6, lr=3e-3, warmup=2, eval_every=3, eval_tokens=256,
        final_eval_tokens=512, vocab_size=320, max_files=40, val_frac=0.2, test_frac=0.2,
        variants=("dense", "avgk-16", "switch", "moe", "hash", "random"), amp=False),
    # all variants x 3 seeds in about an hour on two CPU cores shared with other work
    # (--jobs 4); 120 steps (246k training tokens): shrunk from 400 to fit that budget
    "cpu": dict(
        d_model=128, n_layers=4, n_heads=4, seq_len=128, active=512, expansion=4, block_size=64,
        batch_size=16, steps=120, lr=2e-3, warmup=12, eval_every=20, eval_tokens=8192,
        final_eval_tokens=32768, vocab_size=4096, max_files=None, val_frac=0.05,
        test_frac=0.05,
        variants=("dense", "avgk-16", "avgk-64", "switch", "moe", "hash", "random"), amp=False),
    "gpu": dict(  # minutes on one H200
        d_model=512, n_layers=8, n_heads=8, seq_len=512, active=2048, expansion=8, block_size=256,
        batch_size=32, steps=400, lr=1e-3, warmup=40, eval_every=50, eval_tokens=65536,
        final_eval_tokens=262144, vocab_size=4096, max_files=None, val_frac=0.05,
        test_frac=0.05,
        variants=("dense", "avgk-64", "avgk-256", "switch", "moe", "hash", "random"), amp=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--variants", nargs="+", help="e.g. dense avgk-16 avgk-64 switch moe hash "
                   "random (method-blocksize; default: the preset's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. --set steps=5 d_model=64")
    p.add_argument("--aux-coef", type=float, default=0.01,
                   help="coefficient of the balancing loss of switch and moe (default 0.01)")
    p.add_argument("--out", type=Path, help="results folder (default examples/results/<preset>)")
    p.add_argument("--cache-dir", type=Path, help="tokenizer and token cache "
                   f"(default {lm_data.default_cache_dir()})")
    p.add_argument("--corpus-root", type=Path, help="a folder of .py files instead of the stdlib")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, ...")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, in separate processes (CPU: try 2 on 2 cores)")
    p.add_argument("--threads", type=int,
                   help="torch threads per run (default: torch's own, or cores // jobs)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out that have the same config, run the rest")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite results.md and val_loss.png from --out's runs "
                   "(those with this config), keeping its meta.json")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p.parse_args(argv)


def preset_config(args) -> dict:
    cfg = dict(PRESETS[args.preset])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg or key == "variants":
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(k for k in cfg if k != 'variants')}")
        old = cfg[key]
        if isinstance(old, bool):
            cfg[key] = value.lower() in ("1", "true", "yes")
        elif value == "None":
            cfg[key] = None
        else:
            cfg[key] = float(value) if isinstance(old, float) else int(value)
    cfg["aux_coef"] = args.aux_coef
    return cfg


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, device):
    """Endless training batches (x, y) of random windows; the same order for every variant."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, tokens.size - seq_len - 1, size=batch_size)
        w = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
        w = torch.from_numpy(w).to(device)
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, n_tokens: int, cfg: dict, device) -> float:
    """Mean next-token loss over windows of ``seq_len`` spread evenly over the split (all of it
    when ``n_tokens`` covers it)."""
    L = cfg["seq_len"]
    n_win = max(1, min(n_tokens, tokens.size - 1) // L)
    starts = np.linspace(0, tokens.size - L - 1, n_win).round().astype(np.int64)
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n_win, cfg["batch_size"]):
        w = np.stack([tokens[s:s + L + 1] for s in starts[i:i + cfg["batch_size"]]])
        w = torch.from_numpy(w.astype(np.int64)).to(device)
        with autocast(cfg, device):
            logits = model(w[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(),
                                 reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def autocast(cfg: dict, device):
    if cfg["amp"] and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def sfnn_source() -> str:
    """Where sfnn was imported from, with the git commit when that is a checkout."""
    import subprocess

    where = Path(sfnn.__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{where}" + (f" @ {rev}" if rev else "")


def loadavg_text() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def train_one(variant: str, seed: int, cfg: dict, corpus, device, progress: bool):
    """Train one (variant, seed); returns its results row and its validation curve."""
    spec = parse_variant(variant, active=cfg["active"], block_size=cfg["block_size"])
    mcfg = ModelConfig(vocab_size=corpus.vocab_size, seq_len=cfg["seq_len"],
                       d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                       n_heads=cfg["n_heads"], active=cfg["active"],
                       expansion=cfg["expansion"], ffn=spec, aux_coef=cfg["aux_coef"])
    torch.manual_seed(seed)
    model = GPT(mcfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8)
    aux_coef = cfg["aux_coef"] if spec.method in GATED else 0.0
    data = batches(corpus.tokens["train"], cfg["batch_size"], cfg["seq_len"], seed, device)
    load_start, wall0, cpu0 = loadavg(), time.perf_counter(), time.process_time()
    curve, train_s, recent = [], 0.0, []

    def record(step):
        val = evaluate(model, corpus.tokens["val"], cfg["eval_tokens"], cfg, device)
        train = statistics.fmean(recent) if recent else float("nan")
        curve.append({"variant": spec.name, "seed": seed, "step": step,
                      "tokens": step * cfg["batch_size"] * cfg["seq_len"],
                      "train_loss": train, "val_loss": val})
        recent.clear()
        return val

    val = record(0)
    bar = tqdm(range(cfg["steps"]), desc=f"{spec.name} seed {seed}", disable=not progress,
               dynamic_ncols=True, leave=True)
    for step in bar:
        x, y = next(data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        sync(device)
        t0 = time.perf_counter()
        with autocast(cfg, device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        (loss + sfnn.aux_loss(model).to(loss.device)).backward()  # aux_coef-weighted, or 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(device)
        train_s += time.perf_counter() - t0
        last = loss.item()
        recent.append(last)
        if not math.isfinite(last):
            raise FloatingPointError(f"{spec.name} seed {seed}: loss {last} at step {step}")
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            val = record(step + 1)
        bar.set_postfix(loss=f"{last:.3f}", val=f"{val:.3f}")
    bar.close()

    # The final numbers: the validation split (up to final_eval_tokens) with block usage
    # counted over exactly that pass, then the test split.
    for f in model.sparse_ffns():
        f.reset_usage()
    val_loss = evaluate(model, corpus.tokens["val"], cfg["final_eval_tokens"], cfg, device)
    usage = [f.usage_stats() for f in model.sparse_ffns()]
    test_loss = evaluate(model, corpus.tokens["test"], cfg["final_eval_tokens"], cfg, device)
    flops = fwd_flops_per_token(mcfg)
    n_train = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]

    def mean_of(key):
        return statistics.fmean(float(u[key]) for u in usage) if usage else float("nan")

    row = {
        "variant": spec.name, "method": spec.method, "seed": seed,
        "block_size": spec.block_size or "", "top_k": spec.top_k or "",
        "n_blocks": mcfg.expansion * mcfg.active // spec.block_size if spec.block_size else "",
        "params": sum(p.numel() for p in model.parameters()),
        "aux_coef": aux_coef,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "test_loss": test_loss, "test_ppl": math.exp(test_loss),
        "train_tokens": n_train, "train_s": train_s, "tokens_per_s": n_train / train_s,
        "fwd_flops_per_token": flops["total"], "ffn_fwd_flops_per_token": flops["ffn"],
        "dead_fraction": mean_of("dead_fraction"), "load_cv": mean_of("cv"),
        "max_over_mean": mean_of("max_over_mean"), "entropy": mean_of("entropy"),
        "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
        "threads": torch.get_num_threads(), "load_start": load_start, "load_end": loadavg(),
    }
    return row, curve


def _worker(variant, seed, cfg, cache_dir, corpus_root, device, threads):
    torch.set_num_threads(threads)
    corpus = lm_data.load_corpus(vocab_size=cfg["vocab_size"], cache_dir=cache_dir,
                                 root=corpus_root, max_files=cfg["max_files"],
                                 val_frac=cfg["val_frac"], test_frac=cfg["test_frac"], quiet=True)
    return train_one(variant, seed, cfg, corpus, torch.device(device), False)


def fingerprint(cfg: dict, corpus_info: dict) -> str:
    blob = json.dumps({"cfg": cfg, "corpus": corpus_info["hash"]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def markdown_table(rows: list[dict], cfg: dict, meta: dict) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    order = sorted(by_variant, key=lambda v: statistics.fmean(
        float(r["val_ppl"]) for r in by_variant[v]))
    c = meta["corpus"]

    def per_seed(key):
        sums = [sum(float(r[key]) for r in rows if r["seed"] == seed)
                for seed in {r["seed"] for r in rows}]
        return mean_std([x / 60 for x in sums], ".1f")

    lines = [
        f"Preset `{cfg['preset']}`: d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"{cfg['n_heads']} heads, context {cfg['seq_len']}, {cfg['active']} active FFN cells "
        f"per token (sparse: {cfg['expansion']} x {cfg['active']} cells), "
        f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} tokens, AdamW "
        f"lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), bf16 autocast: "
        f"{cfg['amp'] and meta['device'] != 'cpu'}. Corpus {c['name']} ({c['hash']}), "
        f"byte-level BPE {c['vocab_size']}; train/val/test {c['tokens']['train']:,} / "
        f"{c['tokens']['val']:,} / {c['tokens']['test']:,} tokens.",
        "",
        f"Measured on {meta['device_name']}, {meta['jobs']} run(s) at a time with "
        f"{meta['threads']} torch thread(s) each: one seed of all variants took "
        f"{per_seed('wall_s')} min of wall time ({per_seed('cpu_s')} CPU-min), load average "
        f"(1/5/15 min) {meta['loadavg_begin']} at the start of the last invocation, "
        f"{meta['loadavg_end']} at its end; tokens/s depend on it.",
        "",
        f"Switch and MoE add the Switch balancing loss x {cfg['aux_coef']} (the same coefficient "
        "for both); the other methods have no auxiliary loss. Mean ± std over seeds "
        f"{sorted({int(r['seed']) for r in rows})}; sorted by validation perplexity. Block "
        "usage: over the final validation pass, averaged over layers.",
        "",
        "| variant | g | top_k | blocks | params (M) | val ppl | test ppl | tokens/s | "
        "fwd MFLOP/token | dead blocks | load CV | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in order:
        rs = by_variant[v]
        r0 = rs[0]

        def col(key, fmt, rs=rs):
            return mean_std([float(r[key]) for r in rs], fmt)

        sparse = r0["block_size"] != ""
        lines.append(
            f"| {v} | {r0['block_size'] or '-'} | {r0['top_k'] or '-'} | "
            f"{r0['n_blocks'] or '-'} | {int(r0['params']) / 1e6:.2f} | {col('val_ppl', '.2f')} | "
            f"{col('test_ppl', '.2f')} | {col('tokens_per_s', ',.0f')} | "
            f"{int(r0['fwd_flops_per_token']) / 1e6:.2f} | "
            f"{col('dead_fraction', '.1%') if sparse else '-'} | "
            f"{col('load_cv', '.2f') if sparse else '-'} | {len(rs)} |")
    return "\n".join(lines) + "\n"


def plot(curves: list[dict], path: Path, title: str) -> None:
    """Validation loss against steps, mean over seeds with a min-max band: all steps on the
    left, the second half on the right (where the variants separate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for v in dict.fromkeys(c["variant"] for c in curves):
        pts: dict[int, list[float]] = {}
        for c in curves:
            if c["variant"] == v:
                pts.setdefault(int(c["step"]), []).append(float(c["val_loss"]))
        steps = np.array(sorted(pts))
        vals = [pts[s] for s in steps]
        series[v] = (steps, np.array([statistics.fmean(x) for x in vals]),
                     np.array([min(x) for x in vals]), np.array([max(x) for x in vals]))
    last = max(int(c["step"]) for c in curves)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, start in zip(axes, (0, last / 2), strict=True):
        lows, highs = [], []
        for v, (steps, mean, lo, hi) in series.items():
            keep = steps >= start
            (line,) = ax.plot(steps[keep], mean[keep], label=v, lw=1.5)
            ax.fill_between(steps[keep], lo[keep], hi[keep], color=line.get_color(),
                            alpha=0.15, lw=0)
            lows.append(lo[keep].min())
            highs.append(hi[keep][-1] if start else mean[keep][0])
        if start == 0 and all(map(math.isfinite, lows + highs)):  # leave out the first drop
            ax.set_ylim(min(lows) - 0.05, min(max(highs), min(lows) + 2.0))
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].set_title("second half", fontsize=9)
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = preset_config(args)
    variants = args.variants or list(cfg["variants"])
    for v in variants:  # fail before any training on a bad name or block size
        parse_variant(v, active=cfg["active"], block_size=cfg["block_size"])
    if len(set(variants)) != len(variants):
        raise SystemExit(f"--variants repeats a name: {variants}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    out = args.out or Path(__file__).resolve().parent / "results" / args.preset
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_begin = loadavg_text()

    t0 = time.perf_counter()
    corpus = lm_data.load_corpus(vocab_size=cfg["vocab_size"], cache_dir=args.cache_dir,
                                 root=args.corpus_root, max_files=cfg["max_files"],
                                 val_frac=cfg["val_frac"], test_frac=cfg["test_frac"],
                                 quiet=args.no_progress)
    data_s = time.perf_counter() - t0
    cfg = {"preset": args.preset, **cfg}
    fp = fingerprint({k: v for k, v in cfg.items() if k != "variants"}, corpus.info)

    keep = args.resume or args.report_only
    rows = [r for r in read_csv(out / "runs.csv") if r.get("config") == fp] if keep else []
    done = {(r["variant"], int(r["seed"])) for r in rows}
    curves = [c for c in read_csv(out / "curves.csv")
              if (c["variant"], int(c["seed"])) in done] if keep else []
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None
        else " ".join(["pretrain_lm.py", *argv]),
        "config": cfg, "config_fingerprint": fp, "corpus": corpus.info,
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"),
        "python": platform.python_version(), "torch": torch.__version__,
        "sfnn": sfnn.__version__, "sfnn_source": sfnn_source(),
        "tokenizer_and_tokens_s": round(data_s, 1),
        "loadavg_begin": load_begin,
    }
    print(f"corpus {corpus.info['name']} {corpus.info['hash']}: train/val/test tokens "
          f"{corpus.info['tokens']} ({data_s:.1f} s to tokenize or load); "
          f"device {meta['device_name']}; results -> {out}", flush=True)

    def save():
        rank = {parse_variant(v, active=cfg["active"], block_size=cfg["block_size"]).name: i
                for i, v in enumerate(variants)}
        rows.sort(key=lambda r: (int(r["seed"]), rank.get(r["variant"], len(rank))))
        write_csv(out / "runs.csv", rows)
        write_csv(out / "curves.csv", curves)
        if not args.report_only:
            meta["total_wall_s"] = round(time.perf_counter() - t_start, 1)
            meta["loadavg_end"] = loadavg_text()
            (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if rows:
            (out / "results.md").write_text(markdown_table(rows, cfg, meta))
            plot(curves, out / "val_loss.png",
                 f"{args.preset} preset, {corpus.info['name']}: validation loss "
                 f"(mean over seeds, band: min-max)")

    def finished(row, curve):
        rows.append({**row, "config": fp})
        curves.extend(curve)
        print(f"{row['variant']} seed {row['seed']}: val ppl {row['val_ppl']:.2f}, test ppl "
              f"{row['test_ppl']:.2f}, {row['tokens_per_s']:,.0f} tokens/s, "
              + (f"dead {row['dead_fraction']:.1%}, load CV {row['load_cv']:.2f}, "
                 if row["method"] != "dense" else "")
              + f"{row['wall_s']:.0f} s, {row['cpu_s']:.0f} CPU s (load {row['load_start']:.1f}"
              f"->{row['load_end']:.1f})", flush=True)
        save()

    todo = [(v, seed) for seed in args.seeds for v in variants
            if (parse_variant(v, active=cfg["active"], block_size=cfg["block_size"]).name, seed)
            not in done and not args.report_only]
    if args.report_only:
        if not rows:
            raise SystemExit(f"--report-only: no runs of this config in {out / 'runs.csv'}")
        if (out / "meta.json").exists():  # the training run's machine, jobs, load, command
            meta = json.loads((out / "meta.json").read_text())
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1
                               else None)
    if not args.report_only:
        meta.update(variants=variants, jobs=args.jobs,
                    threads=threads or torch.get_num_threads())
    if args.jobs == 1:
        if threads:
            torch.set_num_threads(threads)
        for v, seed in todo:
            finished(*train_one(v, seed, cfg, corpus, device, not args.no_progress))
    else:  # one process per run, `jobs` at a time; the corpus comes from the cache
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_worker, v, seed, cfg, args.cache_dir, args.corpus_root,
                                   str(device), threads) for v, seed in todo]
            for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="runs",
                            disable=args.no_progress, dynamic_ncols=True):
                finished(*fut.result())
    save()
    print((out / "results.md").read_text() if rows else "no runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
