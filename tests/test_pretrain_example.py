"""examples/pretrain_lm.py end to end on its tiny preset: every FFN variant trains, and the
results (CSV, markdown, PNG, meta) exist, are finite and describe equal active cells."""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers", reason="the example's extra: pip install -e '.[test]'")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.fixture(scope="module")
def pretrain():
    return _load("pretrain_lm")


@pytest.fixture(scope="module")
def tiny_run(pretrain, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    args = ["--preset", "tiny", "--seeds", "0", "1", "--out", str(out), "--cache-dir",
            str(out / "cache"), "--threads", "1", "--no-progress"]
    assert pretrain.main(args) == 0
    return out, args


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_preset_outputs_exist_and_are_finite(pretrain, tiny_run):
    out, _ = tiny_run
    variants = pretrain.PRESETS["tiny"]["variants"]
    rows = _rows(out / "runs.csv")
    assert sorted((r["variant"].split("-")[0], int(r["seed"])) for r in rows) == sorted(
        (v.split("-")[0], s) for v in variants for s in (0, 1))
    for r in rows:
        for key in ("val_loss", "val_ppl", "test_ppl", "tokens_per_s", "fwd_flops_per_token"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (r["variant"], key)
        # Learning happened: below the uniform guess over the vocabulary.
        assert float(r["val_loss"]) < math.log(pretrain.PRESETS["tiny"]["vocab_size"])
        if r["method"] != "dense":
            for key in ("dead_fraction", "load_cv", "max_over_mean", "entropy"):
                assert math.isfinite(float(r[key])), (r["variant"], key)
            assert 0.0 <= float(r["dead_fraction"]) <= 1.0
    curves = _rows(out / "curves.csv")
    steps = pretrain.PRESETS["tiny"]["steps"]
    assert {int(c["step"]) for c in curves} == {0, steps // 2, steps}
    assert all(math.isfinite(float(c["val_loss"])) for c in curves)
    md = (out / "results.md").read_text()
    for v in variants:
        assert f"| {v}" in md or f"| {v}-" in md, v
    assert "± " in md  # two seeds: mean ± std
    assert "0.01" in md  # the balancing-loss coefficient is stated
    assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpus"]["tokens"]["train"] > 0 and meta["corpus"]["hash"]


def test_every_variant_has_the_same_active_cells(pretrain, tiny_run):
    out, _ = tiny_run
    cfg = pretrain.PRESETS["tiny"]
    flops = set()
    for r in _rows(out / "runs.csv"):
        if r["method"] == "dense":
            continue
        g, k, n = int(r["block_size"]), int(r["top_k"]), int(r["n_blocks"])
        assert g * k == cfg["active"], r["variant"]
        assert g * n == cfg["expansion"] * cfg["active"], r["variant"]
        flops.add(int(r["ffn_fwd_flops_per_token"]) - 2 * cfg["d_model"] * n
                  * (r["method"] in ("avgk", "switch", "moe")))
    assert flops == {4 * cfg["d_model"] * cfg["active"]}  # computed cells alike; scoring apart
    for r in _rows(out / "runs.csv"):  # the balancing loss: switch and moe alike, no other
        assert float(r["aux_coef"]) == (0.01 if r["method"] in ("switch", "moe") else 0.0)


def test_resume_keeps_finished_runs(pretrain, tiny_run):
    out, args = tiny_run
    before = (out / "runs.csv").read_text()
    assert pretrain.main([*args, "--resume"]) == 0
    assert (out / "runs.csv").read_text() == before


def test_splits_are_by_file_and_the_tokens_are_cached(tiny_run):
    out, _ = tiny_run
    lm_data = _load("lm_data")
    files = lm_data.stdlib_files()
    assert files and not any(lm_data.EXCLUDED_DIRS & set(p.parts[-3:-1]) for p in files)
    names = [p.as_posix() for p in files]
    splits = [lm_data.split_of(n, 0.05, 0.05) for n in names]
    assert splits == [lm_data.split_of(n, 0.05, 0.05) for n in names]  # a file keeps its split
    if len(files) >= 200:
        for s in ("val", "test"):
            assert 0.02 < splits.count(s) / len(files) < 0.10, s
    (cache,) = (out / "cache").iterdir()
    info = json.loads((cache / "info.json").read_text())
    assert sum(info["files"].values()) == pretrain_tiny_files(files)
    stamp = (cache / "tokenizer.json").stat().st_mtime_ns
    cfg = _load("pretrain_lm").PRESETS["tiny"]
    again = lm_data.load_corpus(vocab_size=cfg["vocab_size"], cache_dir=out / "cache",
                                max_files=cfg["max_files"], val_frac=cfg["val_frac"],
                                test_frac=cfg["test_frac"], quiet=True)
    assert (cache / "tokenizer.json").stat().st_mtime_ns == stamp  # loaded, not retrained
    assert again.info["hash"] == info["hash"]
    assert again.tokens["val"].size == info["tokens"]["val"]
    text = "def f(x):\n    return x  # a comment\n"
    assert again.tokenizer.decode(again.tokenizer.encode(text).ids) == text


def pretrain_tiny_files(files):
    n = len(files)
    return len(files[:: -(-n // 40)]) if n > 40 else n


@pytest.mark.parametrize("bad", ["gshard", "avgk-7", "dense-64", "avgk-x"])
def test_bad_variant_names_fail_before_training(pretrain, tmp_path, bad):
    with pytest.raises(ValueError, match="variant"):
        pretrain.main(["--preset", "tiny", "--variants", bad, "--out", str(tmp_path)])


def test_report_only_trains_nothing_and_rewrites_the_table(pretrain, tiny_run, tmp_path):
    out, args = tiny_run
    runs, meta = (out / "runs.csv").read_text(), (out / "meta.json").read_text()
    (out / "results.md").unlink()
    assert pretrain.main([*args, "--seeds", "0", "1", "2", "--report-only"]) == 0  # seed 2: none
    assert (out / "runs.csv").read_text() == runs  # nothing trained, seed 2 not run
    assert (out / "meta.json").read_text() == meta  # the training run's meta is kept
    assert "± " in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="no runs"):
        pretrain.main(["--preset", "tiny", "--report-only", "--out", str(tmp_path),
                       "--cache-dir", str(out / "cache")])
