"""The sweep's contention condition and decode preset (bench/sweeplib/contention.py, cases.py)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from sweeplib import cases, report  # noqa: E402
from sweeplib.contention import contention  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_contention_runs_busy_processes_and_stops_them():
    with contention(2) as procs:
        assert len(procs) == 2
        time.sleep(0.5)
        assert all(p.poll() is None for p in procs)
        spent = [_cpu_seconds(p.pid) for p in procs]
        assert sum(spent) > 0.1, spent  # they burn CPU
    assert all(p.poll() is not None for p in procs)
    with contention(0) as procs:
        assert procs == []


def test_acceptance_rows_run_idle_and_contended_with_the_issue_targets():
    acc = [c for c in cases.preset_default("cpu") if c.tag == "acceptance"]
    assert {(c.mode, c.contention) for c in acc} == {
        (m, busy) for m in ("forward", "forward+backward") for busy in (0, 1)}
    assert report.ACCEPTANCE_TARGETS == {0: {"forward": 5.5, "forward+backward": 5.0},
                                         1: {"forward": 3.5, "forward+backward": 3.0}}
    rows = []
    for busy, ms in ((0, 10.0), (1, 40.0)):
        for mode in ("forward", "forward+backward"):
            rows += [dict(tag="acceptance", mode=mode, provider="dense", contention=busy,
                          ms=100.0, ms_min=90.0, speedup_vs_dense="", threads=2),
                     dict(tag="acceptance", mode=mode, provider="torch", contention=busy,
                          ms=ms, ms_min=ms, speedup_vs_dense=100.0 / ms, threads=2)]
    lines = report.acceptance_summary(rows)
    assert any("forward (idle)" in s and "10.00x" in s and "PASS" in s for s in lines), lines
    assert any("forward (contention=1)" in s and "2.50x" in s and "FAIL" in s
               for s in lines), lines


def test_decode_preset_covers_the_issue_shapes():
    got = {(c.tokens, c.d_model, c.d_ff, c.block_size, c.top_k, c.dtype)
           for c in cases.preset_decode("cpu")}
    for dtype in ("float32", "bfloat16"):
        assert (1, 4096, 16384, 64, 32, dtype) in got
        assert (1, 512, 8192, 64, 16, dtype) in got
    assert all(c.mode == "decode" for c in cases.preset_decode("cpu"))
    for device in ("cpu", "cuda"):
        for c in cases.preset_decode(device):
            c.validate()
