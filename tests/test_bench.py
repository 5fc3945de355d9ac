"""The benchmark tooling: presets, the cost model, the smoke sweep and gpu_check.sh --dry-run.

The two end-to-end tests run the smoke preset on the CPU in a subprocess (seconds each), so the
whole file stays well under a minute.
"""
import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("sweep.csv", "sweep.md", "speedup_vs_density.png", "speedup_vs_block_size.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sfnn_bench_sweep", ROOT / "bench" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


sweep = _load_sweep()


def _env():
    """The subprocess environment: no Triton interpreter (conftest sets it on CPU machines)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _check_outputs(out: Path) -> list:
    for name in OUTPUTS:
        assert (out / name).is_file(), f"{name} missing from {sorted(os.listdir(out))}"
    for png in OUTPUTS[2:]:
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, f"{png} is not a real plot"
    md = (out / "sweep.md").read_text()
    assert md.startswith("# sfnn benchmark: ") and "| mode | provider |" in md
    assert "Ceilings:" in md
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == sweep.FIELDS
    return rows


def _check_rows(rows: list) -> None:
    for r in rows:
        where = f"{r['mode']}/{r['provider']}/g={r['block_size']}/k={r['top_k']}"
        for key in ("ms", "ms_p20", "ms_p80", "useful_tflops", "gbs", "floor_ms",
                    "frac_of_floor", "ceiling_tflops", "ceiling_gbs"):
            v = float(r[key])
            assert math.isfinite(v) and v > 0, f"{where}: {key}={r[key]}"
        assert 0 < float(r["ms_min"]) <= float(r["ms_p20"]) <= float(r["ms"]) <= float(
            r["ms_p80"]), where
        assert 0 < float(r["density"]) <= 1, where
        assert float(r["density"]) == pytest.approx(
            int(r["top_k"]) * int(r["block_size"]) / int(r["d_ff"]))
        assert 1 <= int(r["distinct_blocks"]) <= int(r["n_blocks"]), where
        assert r["device"] == "cpu" and r["torch"] and r["date"], where
        if r["peak_mem_mb"] != "n/a":
            assert float(r["peak_mem_mb"]) >= 0, where
        if r["provider"] == "dense":
            assert float(r["speedup_vs_dense"]) == pytest.approx(1.0)
            assert r["check"] == ""
        else:
            assert float(r["speedup_vs_dense"]) > 0, where
            if r["mode"] != "backward":
                assert r["check"] == "ok", f"{where}: rel_err={r['rel_err']}"
    providers = {r["provider"] for r in rows}
    assert {"dense", "naive", "gather", "torch"} <= providers
    assert not providers & {"triton", "cuda"}  # neither runs on CPU tensors
    assert {r["mode"] for r in rows} == set(sweep.MODES)


def test_presets_are_valid():
    for name, preset in sweep.PRESETS.items():
        for device in ("cpu", "cuda"):
            cases = preset(device)
            assert cases, name
            for c in cases:
                c.validate()


def test_default_preset_starts_with_the_acceptance_shape():
    cases = sweep.preset_default("cpu")
    first = cases[:2]
    assert [c.mode for c in first] == ["forward", "forward+backward"]
    for c in first:
        assert (c.tokens, c.d_model, c.d_ff, c.block_size, c.top_k, c.dtype, c.activation) == (
            4096, 512, 8192, 64, 16, "float32", "gelu")
        assert c.providers == ("dense", "torch") and c.tag == "acceptance"


def test_quick_preset_covers_its_grid():
    cases = sweep.preset_quick("cpu")
    got = {(c.mode, c.block_size, round(1 / c.density)) for c in cases}
    want = {(m, g, inv) for m in ("forward", "forward+backward") for g in (32, 64, 128)
            for inv in (4, 8, 16)}
    assert want <= got


def test_cost_model_matches_spec():
    T, d, d_ff, g, k = 100, 64, 1024, 32, 4
    nb, es = d_ff // g, 4
    fwd = sweep.cost_model(sweep.Case(T, d, d_ff, g, k, "forward"), distinct_blocks=nb)
    assert fwd["useful_flops"] == 4 * T * d * k * g
    assert fwd["floor_flops"] == 4 * T * d * k * g + 2 * T * d * nb + d_ff * d
    assert fwd["dense_flops"] == 4 * T * d * d_ff
    # The combine as the kernels do it: an fp32 read-modify-write (8 bytes) per partial element.
    assert fwd["combine_bytes"] == 8 * T * k * d
    assert fwd["floor_bytes"] > 2 * T * d * 4 + 2 * d_ff * d * es  # accumulator + weights
    bwd = sweep.cost_model(sweep.Case(T, d, d_ff, g, k, "backward"), distinct_blocks=nb)
    assert bwd["useful_flops"] == 2 * fwd["useful_flops"]
    assert bwd["combine_bytes"] == 8 * T * k * d  # dx
    full = sweep.cost_model(sweep.Case(T, d, d_ff, g, k, "forward+backward"), nb)
    assert full["useful_flops"] == 3 * fwd["useful_flops"]
    assert full["floor_bytes"] == fwd["floor_bytes"] + bwd["floor_bytes"]
    assert full["combine_bytes"] == fwd["combine_bytes"] + bwd["combine_bytes"]
    one = sweep.cost_model(sweep.Case(T, d, d_ff, g, 1, "forward"), distinct_blocks=nb)
    assert one["combine_bytes"] == 0  # one block per token: nothing to combine
    dec = sweep.cost_model(sweep.Case(2, d, d_ff, g, k, "decode"), distinct_blocks=2 * k)
    # Decoding keeps kbar cached and reads only the selected blocks' rows.
    assert dec["floor_flops"] == 4 * 2 * d * k * g + 2 * 2 * d * nb
    assert dec["floor_bytes"] < 2 * d_ff * d * es
    assert sweep.top_k_for(8192, 64, 1 / 8) == 16 and sweep.top_k_for(2048, 256, 1 / 32) is None
    l2, hbm = sweep.floors(fwd, tflops=1e-3, gbs=1.0, cache_gbs=4.0)
    assert l2 == pytest.approx(max(fwd["floor_flops"] / 1e9, fwd["floor_bytes"] / 1e9,
                                   fwd["combine_bytes"] / 4e9))
    assert hbm == pytest.approx(max(fwd["floor_flops"] / 1e9,
                                    (fwd["floor_bytes"] + fwd["combine_bytes"]) / 1e9))
    assert hbm >= l2


def test_model_prints_every_phase_for_both_schedules_and_v1(capsys):
    assert sweep.main(["--model"]) == 0
    out = capsys.readouterr().out
    for phase in ("scoring", "routing", "fwd pre-activation", "fwd output", "dh", "dx", "dW"):
        assert f"| {phase} " in out, phase
    for g in (64, 128):
        assert f"T=16384 d_model=4096 d_ff=32768 g={g} " in out
    assert out.count("v2 tile") == 2 and out.count("v2 slice") == 2 and out.count(" v1 |") == 2
    from sweeplib.model import ratios

    r = ratios()
    for g in (64, 128):
        # The L2 schedule beats the fused one at this shape, and both beat the v1 kernels.
        assert r[(g, "v2 slice")] > r[(g, "v2 tile")] > r[(g, "v1")] > 1.0


def test_smoke_sweep(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:  # in-process: saves a second interpreter start; the sweep sets the thread count
        rc = sweep.main(["--preset", "smoke", "--device", "cpu", "--threads", "1",
                         "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "ceilings:" in out
    _check_rows(_check_outputs(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(OUTPUTS)


@pytest.mark.slow  # ~2.5 min on 2 shared cores: the probe runs every kernel in the interpreter
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout
    _check_rows(_check_outputs(out))
    files = sorted(p.name for p in out.iterdir())
    # The device tool returns at most 8 plain files from the output folder.
    assert files == sorted(["gpu_check.log", "steps.log", "gpu_probe.csv", "gpu_probe.md",
                            *OUTPUTS]), files
    log = (out / "gpu_check.log").read_text()
    assert "== environment ==" in log and "torch:" in log and "nvidia-smi" in log
    assert "probe: rc=0" in log and "sweep: rc=0" in log
    # The probe's CPU side: every part ran (its atomic kernel checked its own sums) and every
    # phase of both schedules has a row with the cost model beside it.
    with open(out / "gpu_probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    parts = {r["part"] for r in rows}
    assert parts == {"atomics", "dense", "sparse"}, parts
    for schedule, phases in (("tile", {"fwd fused"}),
                             ("slice", {"fwd pre-activation", "fwd output"})):
        got = {r["phase"] for r in rows if r["schedule"] == schedule}
        want = {"scoring", "routing", "dh", "dx", "dW", "fwd+bwd"} | phases
        assert want <= got, (schedule, want - got)
        for r in rows:
            if r["schedule"] == schedule and r["phase"] in want:
                assert float(r["ms"]) > 0 and float(r["model_ms"]) > 0, r
    md = (out / "gpu_probe.md").read_text()
    assert md.startswith("# sfnn GPU probe: ") and "fp32 atomic adds" in md


def test_cuda_timer_shape(monkeypatch):
    """The GPU timer cannot run here; check its contract with do_bench mocked."""
    testing = pytest.importorskip("triton.testing")
    calls = []

    def fake_do_bench(fn, warmup, rep, quantiles):
        fn()
        calls.append(quantiles)
        return [2.0, 1.5, 3.0, 1.0][:len(quantiles)]

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    out = sweep.time_cuda({"a": lambda: None, "b": lambda: None}, budget_s=1.0, min_reps=3)
    assert out == {"a": (2.0, 1.5, 3.0, 1.0, -1), "b": (2.0, 1.5, 3.0, 1.0, -1)}
    assert calls[0][:3] == [0.5, 0.2, 0.8]
    cpu = sweep.time_cpu({"a": lambda: None}, budget_s=0.0, min_reps=3)
    assert len(cpu["a"]) == 5 and cpu["a"][4] == 3


def test_cpu_timer_runs_its_rounds_in_random_orders():
    """Every provider follows every other one in some round (a rotation gave each provider the
    same predecessor in most rounds), and the orders repeat run to run (seeded)."""
    def orders():
        calls = []
        fns = {n: (lambda n=n: calls.append(n)) for n in "abcd"}
        sweep.time_cpu(fns, budget_s=0.0, min_reps=40, max_reps=40)
        return calls[4:]  # after one warm-up call each

    calls = orders()
    rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 40 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({(r[i], r[i + 1]) for r in rounds for i in range(3)}) == 12  # every ordered pair
    assert orders() == calls


@pytest.mark.parametrize("mode, own", [("decode", True), ("forward", False)])
def test_cpu_decode_providers_get_their_own_weights(monkeypatch, mode, own):
    """On the CPU a decode case builds one problem (same values, separate tensors) per
    provider, so that none finds another's rows in cache; other modes share one."""
    from sweeplib import runner

    seen = {}
    real = runner.make_runner

    def spy(prov, pb):
        seen[prov] = pb
        return real(prov, pb)

    monkeypatch.setattr(runner, "make_runner", spy)
    case = sweep.Case(2, 16, 64, 16, 2, mode, providers=("dense", "gather", "torch"))
    ceilings = runner.Ceilings({"float32": 1.0}, 1.0, "test")
    rows = runner._run_case(case, "cpu", ceilings, {}, 0.0, {}, lambda *a: None, [])
    assert {r["provider"] for r in rows} == {"dense", "gather", "torch"}
    keys = [pb.keys for pb in seen.values()]
    assert all(torch.equal(k, keys[0]) for k in keys)
    distinct = len({k.data_ptr() for k in keys})
    assert distinct == (3 if own else 1)
