"""The Triton block-FFN launchers against the dense-masked reference.

Calls ``block_ffn_fwd`` / ``block_ffn_bwd`` directly (the backend protocol) and compares the
output and every gradient (dx, dkeys, dvalues, dkey_bias, dgates) with ``block_ffn_ref`` run in
float64 on upcast inputs, under both combine schedules ("tile": the fused forward; "slice": the
pre-activation and output kernels, d_model slices outermost, ``slice_d=32`` so that the test
shapes span several slices) and both combine modes (atomic, deterministic by slot). Without a
GPU the kernels run in Triton's interpreter on CPU tensors (small shapes); with one, on CUDA
tensors, plus a large case.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot run")

from sfnn.triton_kernels import _aot, _common, _configs, _model, block_ffn  # noqa: E402
from sfnn.triton_kernels.block_ffn import block_ffn_bwd, block_ffn_fwd  # noqa: E402
from sfnn.triton_kernels.routing import max_tiles, route  # noqa: E402

import sfnn  # noqa: E402
from sfnn.reference import block_ffn_ref, sparse_ffn_ref  # noqa: E402
from sfnn.testing import TOLERANCES, assert_close  # noqa: E402

ON_CPU = not torch.cuda.is_available()
# "slice" runs in slices of 32 columns (the widest interpreter BLOCK_D) on the CPU, so that the
# small test shapes cross several slices; on a GPU the smallest legal width (the widest BLOCK_D).
SLICE = 32 if _common.INTERPRET else _configs.max_block_d()
needs_cuda = pytest.mark.skipif(ON_CPU, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture
def poison(monkeypatch):
    """Float tensors from torch.empty/empty_like come back NaN-filled while the test runs, so an
    output element the kernels never write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


def _indices(T, n_blocks, top_k, mode, gen):
    """int32 (T, top_k) block indices. mode: "distinct" (a random subset per token),
    "dup" (duplicates inside rows), "hot" (every token picks block 1 in slot 0, so that block
    spans several tiles), "unused" (only the even blocks are ever chosen)."""
    if mode == "distinct":
        rows = [torch.randperm(n_blocks, generator=gen)[:top_k] for _ in range(T)]
        return torch.stack(rows).to(torch.int32)
    if mode == "dup":
        idx = torch.randint(0, n_blocks, (T, top_k), generator=gen)
        idx[:, -1] = idx[:, 0]  # every row repeats its first block
        return idx.to(torch.int32)
    if mode == "hot":
        idx = torch.randint(0, n_blocks, (T, top_k), generator=gen)
        idx[:, 0] = 1
        return idx.to(torch.int32)
    if mode == "unused":
        return (2 * torch.randint(0, (n_blocks + 1) // 2, (T, top_k), generator=gen)).to(
            torch.int32)
    raise ValueError(mode)


def _problem(T, d, g, n_blocks, top_k, *, dtype, device, key_bias=True, out_bias=True,
             gates=True, mode="distinct", seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_ff = g * n_blocks

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    p = dict(
        x=rnd(T, d),
        keys=rnd(d_ff, d, scale=d**-0.5),
        values=rnd(d_ff, d, scale=(top_k * g) ** -0.5),
        indices=_indices(T, n_blocks, top_k, mode, gen).to(device),
        key_bias=rnd(d_ff, scale=0.5) if key_bias else None,
        out_bias=rnd(d, scale=0.5) if out_bias else None,
        gates=(torch.rand(T, top_k, generator=gen) + 0.25).to(device) if gates else None,
        dy=rnd(T, d),
    )
    return p


def _triton(p, *, g, activation, deterministic, save=True, schedule="tile", needs=(True,) * 5):
    slice_d = SLICE if schedule == "slice" else None
    y, saved, route_ = block_ffn_fwd(
        p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["out_bias"], p["gates"],
        block_size=g, activation=activation, save_for_backward=save,
        deterministic=deterministic, schedule=schedule, slice_d=slice_d)
    grads = block_ffn_bwd(
        p["dy"], p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["gates"], saved,
        route_, block_size=g, activation=activation, deterministic=deterministic, needs=needs,
        schedule=schedule, slice_d=slice_d)
    return (y, *grads)


def _reference(p, *, g, activation):
    names = ("x", "keys", "values", "key_bias", "out_bias", "gates")
    ins = {n: (p[n].detach().double().requires_grad_() if p[n] is not None else None)
           for n in names}
    y = block_ffn_ref(ins["x"], ins["keys"], ins["values"], p["indices"], block_size=g,
                      key_bias=ins["key_bias"], out_bias=ins["out_bias"], gates=ins["gates"],
                      activation=activation)
    y.backward(p["dy"].double())
    grad = lambda n: None if ins[n] is None else ins[n].grad
    return y, grad("x"), grad("keys"), grad("values"), grad("key_bias"), grad("gates")


NAMES = ("y", "dx", "dkeys", "dvalues", "dkey_bias", "dgates")


def _check(p, *, g, activation, deterministic, save=True, schedule="tile"):
    out = _triton(p, g=g, activation=activation, deterministic=deterministic, save=save,
                  schedule=schedule)
    ref = _reference(p, g=g, activation=activation)
    atol, rtol = TOLERANCES[p["x"].dtype]
    for name, a, e in zip(NAMES, out, ref, strict=True):
        if e is None:
            assert a is None, f"{name} should be None"
            continue
        assert a.dtype == (torch.float32 if name == "dgates" else p["x"].dtype), name
        assert_close(a, e, atol=atol, rtol=rtol, name=name)
    return out


# T, d, g, n_blocks, top_k, index mode: odd T and d, g below 16 and not a power of two,
# n_blocks not a power of two, top_k 1 / odd / == n_blocks, hot and unused blocks, duplicates.
SHAPES = [
    (37, 40, 24, 5, 3, "distinct", "T37-d40-g24-nb5-k3"),
    (64, 32, 16, 6, 1, "distinct", "T64-d32-g16-nb6-k1"),
    (45, 24, 8, 4, 4, "distinct", "T45-d24-g8-nb4-k4=nb"),
    (70, 48, 32, 7, 3, "hot", "T70-d48-g32-nb7-k3-hot"),
    (53, 20, 16, 9, 2, "unused", "T53-d20-g16-nb9-k2-unused"),
    (41, 36, 20, 3, 3, "dup", "T41-d36-g20-nb3-k3-dup"),
]
# Every shape under both combine modes; the schedules alternate over the shapes so that each
# (combine mode, schedule) pair meets several shapes, and the first shape runs all four.
SHAPE_PARAMS = [
    pytest.param(*shape[:6], det, schedule,
                 id=f"{shape[6]}-{'det' if det else 'atomic'}-{schedule}")
    for i, shape in enumerate(SHAPES) for det in (False, True)
    for schedule in (("tile", "slice") if i == 0 else (("tile", "slice")[(i + det) % 2],))
]


@pytest.mark.parametrize("T,d,g,nb,k,mode,deterministic,schedule", SHAPE_PARAMS)
def test_shapes_fp32(T, d, g, nb, k, mode, deterministic, schedule, device, poison):
    p = _problem(T, d, g, nb, k, dtype=torch.float32, device=device, mode=mode)
    _check(p, g=g, activation="gelu", deterministic=deterministic, schedule=schedule)


@pytest.mark.parametrize("gates", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_activations_bias_gates(activation, bias, gates, device, poison):
    # The schedule alternates so that each activation meets both (the act runs in different
    # kernels: the fused forward, or the output kernel on the stored A).
    schedule = ("tile", "slice")[(bias + gates) % 2]
    p = _problem(29, 40, 16, 5, 2, dtype=torch.float32, device=device, key_bias=bias,
                 out_bias=bias, gates=gates, mode="dup", seed=1)
    _check(p, g=16, activation=activation, deterministic=False, schedule=schedule)


@pytest.mark.parametrize("schedule", ["tile", "slice"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_recompute_without_saved(deterministic, schedule, device, poison):
    """save_for_backward=False: the backward recomputes the pre-activation (and sorts again)."""
    p = _problem(47, 40, 24, 4, 3, dtype=torch.float32, device=device, mode="hot", seed=2)
    _check(p, g=24, activation="silu", deterministic=deterministic, save=False,
           schedule=schedule)


@pytest.mark.parametrize("schedule", ["tile", "slice"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(dtype, deterministic, schedule, device, poison):
    p = _problem(57, 48, 16, 6, 3, dtype=dtype, device=device, mode="hot", seed=3)
    _check(p, g=16, activation="gelu", deterministic=deterministic, schedule=schedule)


@pytest.mark.parametrize("dtype,schedule", [(torch.float32, "tile"), (torch.bfloat16, "slice")],
                         ids=["fp32-tile", "bf16-slice"])
def test_deterministic_is_bitwise_repeatable(dtype, schedule, device):
    p = _problem(33, 40, 24, 5, 3, dtype=dtype, device=device, mode="hot", seed=4)
    first = _triton(p, g=24, activation="gelu", deterministic=True, schedule=schedule)
    second = _triton(p, g=24, activation="gelu", deterministic=True, schedule=schedule)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


_DETERMINISM_SCRIPT = """
import hashlib, sys, torch
sys.path.insert(0, {tests!r})
from test_triton_ffn import _problem, _triton
p = _problem(20, 40, 16, 4, 2, dtype=torch.bfloat16, device={device!r}, mode="hot", seed=4)
for schedule in ("tile", "slice"):
    h = hashlib.sha256()
    for t in _triton(p, g=16, activation="gelu", deterministic=True, schedule=schedule):
        h.update(t.detach().float().cpu().numpy().tobytes())
    print(schedule, h.hexdigest())
"""


@pytest.mark.slow
def test_deterministic_across_processes(device):
    """Deterministic mode gives the same bits in two fresh processes, under both schedules: no
    autotuning (whose winner may differ between processes) decides a reduction order there."""
    code = _DETERMINISM_SCRIPT.format(tests=os.path.dirname(__file__), device=str(device))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    digests = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(proc.stdout.strip().splitlines()[-2:])
    assert digests[0] == digests[1], digests
    assert [d.split()[0] for d in digests[0]] == ["tile", "slice"]
    assert all(len(d.split()[1]) == 64 for d in digests[0])


def test_deterministic_never_autotunes(monkeypatch, device):
    """Deterministic launches take one fixed config per kernel (_configs.fixed_config) and
    bypass the autotuner, so no timing decides the tile sizes and thus the reduction order."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"autotuner ran for {self.fn} in deterministic mode")

    p = _problem(20, 40, 16, 4, 2, dtype=torch.float32, device=device, mode="hot", seed=5)
    ref = _triton(p, g=16, activation="gelu", deterministic=True, schedule="slice")
    monkeypatch.setattr(block_ffn.triton.runtime.Autotuner, "run", refuse)
    for schedule in ("tile", "slice"):
        out = _triton(p, g=16, activation="gelu", deterministic=True, schedule=schedule)
        for name, a, b in zip(NAMES, out, ref, strict=True):
            assert_close(a, b, name=name)
    with pytest.raises(AssertionError, match="autotuner ran"):
        _triton(p, g=16, activation="gelu", deterministic=False, schedule="tile")


def test_fixed_config_is_a_pure_function_of_the_shape():
    for kernel in _configs.KERNELS:
        for dot, elem in (("mma", 2), ("mma", 4), ("fma", 4)):
            for G in (16, 32, 64, 128, 256):
                a = _configs.fixed_config(kernel, dot, G, elem, interpret=False)
                b = _configs.fixed_config(kernel, dot, G, elem, interpret=False)
                assert a is b and a.dot == dot, (kernel, dot, G)


NEEDS = [
    pytest.param((True, False, False, False, False), id="dx"),
    pytest.param((False, True, False, False, False), id="dkeys"),
    pytest.param((False, False, True, False, False), id="dvalues"),
    pytest.param((False, False, False, True, False), id="dkey_bias"),
    pytest.param((False, False, False, False, True), id="dgates"),
    pytest.param((True, False, True, False, True), id="dx-dvalues-dgates"),
    pytest.param((False,) * 5, id="none"),
]
# The kernels each gradient needs (dh writes dA for dx/dkeys/dkey_bias, gH for dvalues, and the
# gate gradients); the dW kernel runs once for keys (and/or key_bias), once for values.
_NEEDED_KERNELS = {0: {"dh", "dx"}, 1: {"dh", "dw"}, 2: {"dh", "dw"}, 3: {"dh", "dw"}, 4: {"dh"}}


@pytest.fixture(scope="module")
def needs_case():
    """One problem and its full deterministic backward, shared by the ``needs`` cases."""
    device = "cpu" if ON_CPU else "cuda"
    p = _problem(31, 40, 16, 5, 2, dtype=torch.float32, device=device, mode="dup", seed=6)
    return p, _triton(p, g=16, activation="gelu", deterministic=True)


@pytest.mark.parametrize("needs", NEEDS)
def test_needs_skips_work(needs, needs_case, monkeypatch):
    p, full = needs_case
    launched = []
    real = block_ffn._launch

    def spy(kernel, kind, *args, **kwargs):
        launched.append(kind)
        return real(kernel, kind, *args, **kwargs)

    monkeypatch.setattr(block_ffn, "_launch", spy)
    out = _triton(p, g=16, activation="gelu", deterministic=True, needs=needs)
    launched = [k for k in launched if k not in ("fwd", "pre", "out")]  # the forward's
    for i, need in enumerate(needs):
        if need:
            assert torch.equal(out[1 + i], full[1 + i]), NAMES[1 + i]
        else:
            assert out[1 + i] is None, NAMES[1 + i]
    want = set().union(*[_NEEDED_KERNELS[i] for i, n in enumerate(needs) if n])
    assert set(launched) == want, launched
    if needs[1] or needs[3]:
        assert launched.count("dw") == 1 + needs[2]


def test_backward_reuses_the_forward_routing(device, monkeypatch):
    p = _problem(24, 32, 16, 5, 3, dtype=torch.float32, device=device, mode="hot", seed=7)
    for det in (False, True):
        y, saved, packed = block_ffn_fwd(
            p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["out_bias"],
            p["gates"], block_size=16, activation="gelu", save_for_backward=True,
            deterministic=det)
        assert packed.dtype == torch.int32
        assert packed.numel() == block_ffn.route_numel(24, 3, 5, det)
        args = (p["dy"], p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["gates"],
                saved)
        kw = dict(block_size=16, activation="gelu", deterministic=det)
        again = block_ffn_bwd(*args, torch.empty(0, dtype=torch.int32), **kw)
        with monkeypatch.context() as m:
            m.setattr(block_ffn, "sort_pairs", lambda *a, **k: pytest.fail("sorted again"))
            reused = block_ffn_bwd(*args, packed, **kw)
        for name, a, b in zip(NAMES[1:], reused, again, strict=True):
            assert torch.equal(a, b), name
    y, saved, packed = block_ffn_fwd(
        p["x"], p["keys"], p["values"], p["indices"], None, None, None, block_size=16,
        activation="gelu", save_for_backward=False, deterministic=False)
    assert saved.numel() == 0 and packed.numel() == 0


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_launch_grids_follow_the_combine(deterministic, monkeypatch):
    """By slot (deterministic), each launch covers one slot's T pairs: the forward and dx launch
    once per slot at that slot's segments, and the one dh launch has a grid column per slot
    (its programs scan only their slot's segments, not every (slot, block) segment). Atomic: one
    launch over all T * top_k pairs. The kernels are not run, only their grids inspected."""
    T, d, g, nb, k = 24, 32, 16, 5, 3
    p = _problem(T, d, g, nb, k, dtype=torch.float32, device="cpu", mode="hot", seed=7)
    launches = []
    monkeypatch.setattr(block_ffn, "_launch", lambda kernel, kind, grid, args, consts, det:
                        launches.append((kind, grid, args)))
    _triton(p, g=g, activation="gelu", deterministic=deterministic, schedule="tile")
    kinds = [kind for kind, _, _ in launches]
    pairs, slots = (T, k) if deterministic else (T * k, 1)
    assert kinds == ["fwd"] * slots + ["dh"] + ["dx"] * slots + ["dw", "dw"], kinds
    meta = {"BLOCK_T": 16, "BLOCK_D": 32, "BLOCK_G": 16}
    n_tiles = max_tiles(pairs, nb, 16)
    for kind, grid, _ in launches:
        if kind == "dh":
            assert grid(meta) == (n_tiles, slots)
        elif kind in ("fwd", "dx"):
            assert grid(meta)[0] == n_tiles
    runtime_args = [n for n, is_constexpr in _common.kernel_parameters(
        block_ffn._block_ffn_fwd_kernel) if not is_constexpr]
    at = runtime_args.index("seg_base")
    seg_bases = [args[at] for kind, _, args in launches if kind == "fwd"]
    assert seg_bases == [j * nb for j in range(slots)]


def test_several_slices_and_partial_last_slice(device, poison):
    """d_model 72 in slices of 32: two full slices and a partial one (the shape tests cover
    two slices under both combine modes)."""
    p = _problem(24, 72, 16, 5, 3, dtype=torch.float32, device=device, mode="hot", seed=8)
    _check(p, g=16, activation="relu", deterministic=False, schedule="slice")


def test_schedule_selection(monkeypatch):
    cpu = torch.device("cpu")
    args = (16384, 4096, 32768, 128, 32, 2, False, cpu)
    monkeypatch.delenv(block_ffn.SCHEDULE_ENV, raising=False)
    auto = block_ffn.resolve_schedule(None, *args)
    assert auto[0] == _model.choose_schedule(16384, 4096, 32768, 128, 32, 2, False,
                                             _model.H200.l2_bytes,
                                             _configs.max_block_d())
    assert block_ffn.resolve_schedule("tile", *args) == ("tile", 4096)
    monkeypatch.setenv(block_ffn.SCHEDULE_ENV, "slice")
    schedule, width = block_ffn.resolve_schedule(None, *args)
    assert schedule == "slice" and width % _configs.max_block_d() == 0
    assert 16384 * width * 4 <= _model.L2_LIVE_FRACTION * _model.H200.l2_bytes
    assert block_ffn.resolve_schedule("tile", *args)[0] == "tile"  # the argument wins
    monkeypatch.setenv(block_ffn.SCHEDULE_ENV, "diagonal")
    with pytest.raises(ValueError, match="SFNN_COMBINE"):
        block_ffn.resolve_schedule(None, *args)
    with pytest.raises(ValueError, match="slice_d"):
        block_ffn.resolve_schedule("slice", *args, slice_d=_configs.max_block_d() + 1)


def test_model_prefers_the_l2_slices_at_scale():
    """The cost model's default: at T=16k, d_model=4096 the accumulator (268 MB) is far past L2,
    so the sliced schedule wins; a small problem's accumulator fits, so the fused one does; one
    block per token has nothing to combine."""
    l2 = _model.H200.l2_bytes
    assert _model.choose_schedule(16384, 4096, 32768, 64, 64, 2, False, l2) == "slice"
    assert _model.choose_schedule(16384, 4096, 32768, 128, 32, 2, False, l2) == "slice"
    assert _model.choose_schedule(512, 1024, 4096, 64, 8, 2, False, l2) == "tile"
    assert _model.choose_schedule(16384, 4096, 32768, 128, 1, 2, False, l2) == "tile"


# One token (issue: the forward's fp32 accumulator was ``out_bias.float().expand(1, d)
# .contiguous()``, a view of out_bias for fp32, so the atomics wrote into the parameter): every
# dtype, bias setting and top_k 1 (one slot: no combine) or 3 (the atomic combine); the
# deterministic combine once per dtype.
ONE_TOKEN = [pytest.param(dtype, bias, k, False, id=f"{str(dtype)[6:]}-{bias}-k{k}")
             for dtype in (torch.float32, torch.float16, torch.bfloat16)
             for bias in ("both", "none", "out_only") for k in (1, 3)]
ONE_TOKEN += [pytest.param(dtype, "both", 3, True, id=f"{str(dtype)[6:]}-both-k3-det")
              for dtype in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("dtype,bias,top_k,deterministic", ONE_TOKEN)
def test_one_token_leaves_parameters_alone(dtype, bias, top_k, deterministic, device):
    d, d_ff, g = 32, 128, 32
    gen = torch.Generator().manual_seed(top_k)
    x = torch.randn(1, d, generator=gen).to(dtype).to(device)
    keys = (torch.randn(d_ff, d, generator=gen) / d**0.5).to(dtype).to(device)
    values = (torch.randn(d_ff, d, generator=gen) / 16).to(dtype).to(device)
    kb = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype).to(device) if bias == "both" \
        else None
    ob = (torch.randn(d, generator=gen) * 0.1).to(dtype).to(device) if bias != "none" else None
    params = [t.requires_grad_() for t in (x, keys, values, kb, ob) if t is not None]
    before = [t.detach().clone() for t in params]
    y = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=top_k, key_bias=kb, out_bias=ob,
                        activation="gelu", backend="triton", deterministic=deterministic)
    y.backward(torch.ones_like(y))
    for t, b in zip(params, before, strict=True):
        assert torch.equal(t.detach(), b), "a parameter changed"
    ref_in = [None if t is None else t.detach().double().requires_grad_()
              for t in (x, keys, values, kb, ob)]
    ref = sparse_ffn_ref(ref_in[0], ref_in[1], ref_in[2], block_size=g, top_k=top_k,
                         key_bias=ref_in[3], out_bias=ref_in[4], activation="gelu")
    ref.backward(torch.ones_like(ref))
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, ref, atol=atol, rtol=rtol, name="y")
    names = ("x", "keys", "values", "key_bias", "out_bias")
    for name, t, r in zip(names, (x, keys, values, kb, ob), ref_in, strict=True):
        if t is not None:
            assert_close(t.grad, r.grad, atol=atol, rtol=rtol, name=f"d{name}")


@pytest.mark.parametrize("schedule", ["tile", "slice"])
def test_relu_propagates_nan(schedule, device):
    """A NaN pre-activation stays NaN through relu (as torch.relu), and only its token's row."""
    p = _problem(30, 40, 16, 5, 2, dtype=torch.float32, device=device, mode="distinct", seed=9)
    p["x"][7, 3] = float("nan")
    y = _triton(p, g=16, activation="relu", deterministic=False, schedule=schedule)[0]
    ref = _reference(p, g=16, activation="relu")[0]
    assert torch.isnan(y[7]).all()
    others = torch.arange(30) != 7
    assert_close(y[others], ref[others], name="y")


def test_routing():
    idx = torch.tensor([[2, 0], [0, 1], [2, 2]], dtype=torch.int32)
    r = route(idx, 4)
    assert r.order.tolist() == [1, 2, 3, 0, 4, 5]
    assert r.seg_offsets.tolist() == [0, 2, 3, 6, 6]
    assert r.counts().tolist() == [2, 1, 3, 0]
    s = route(idx, 4, by_slot=True)  # segment = slot * 4 + block
    assert s.order.tolist() == [2, 0, 4, 1, 3, 5]
    assert s.seg_offsets.tolist() == [0, 1, 1, 3, 3, 4, 5, 6, 6]
    assert max_tiles(6, 4, 2) >= sum(-(-c // 2) for c in r.counts().tolist())
    back = type(s).unpack(s.pack(), 3, 2, 4, True)
    assert torch.equal(back.order, s.order) and torch.equal(back.seg_offsets, s.seg_offsets)


def test_op_layer_validates_before_the_launcher():
    """The launchers only assert; the op layer raises the clear errors."""
    p = _problem(8, 16, 16, 2, 1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        sfnn.block_ffn(p["x"], p["keys"], p["values"], p["indices"], block_size=12,
                       backend="triton")
    with pytest.raises(ValueError, match="activation"):
        sfnn.block_ffn(p["x"], p["keys"], p["values"], p["indices"], block_size=16,
                       activation="tanh", backend="triton")
    with pytest.raises(AssertionError):
        block_ffn_fwd(p["x"], p["keys"], p["values"], p["indices"].long(), None, None, None,
                      block_size=16, activation="relu", save_for_backward=False,
                      deterministic=False)


def test_aot_specs_cover_every_kernel_and_dtype():
    specs = _aot.specs()
    names = " ".join(s.name for s in specs)
    for kernel in ("fwd", "pre", "out", "dh", "dx", "dw"):
        for label in ("bf16", "fp16", "fp32-tf32", "fp32-ieee"):
            assert f"block_ffn_{kernel}[{label}," in names, (kernel, label)
    for s in specs:
        # Tensor-core specs need a wgmma-sized M (token tile, or d_model chunk for dW);
        # true-fp32 ("ieee") dots have no tensor-core path and run on the FMA units.
        if s.kernel_name.startswith("block_ffn"):
            assert s.is_gemm == ("ieee" not in s.name), s.name
            if s.is_gemm:
                assert s.constexprs["BLOCK_T"] >= 64 or s.constexprs["BLOCK_D"] >= 64, s.name
    for kernel in ("fwd", "pre", "out", "dh", "dx"):  # the gated kernels (dW: the plain one)
        for label in ("bf16", "fp32-tf32", "fp32-ieee"):
            assert f"gated_ffn_{kernel}[{label}," in names, (kernel, label)
    assert "gated_ffn_dh[bf16,g=256," in names and ",recompute]" in names
    for rows in (64, 128):  # the report's 128-row bf16 table has rows at g=64 and g=128
        assert any(s.rows >= 128 and s.dtype == "bf16" and s.block_size == rows
                   for s in specs if s.kernel_name == "block_ffn_fwd")


def test_aot_signature_follows_the_kernel():
    fn = block_ffn._block_ffn_dx_kernel
    cx = dict(BS=64, G=64, ATOMIC=True, FIRST=False, LAST=False, DOT_PREC="tf32", CHUNK=256,
              BLOCK_T=64, BLOCK_D=64)
    sig = _aot.signature(fn, cx, {"acc_ptr": "*fp32", "order_ptr": "*i32",
                                  "seg_off_ptr": "*i32"}, "*bf16")
    assert list(sig) == [n for n, _ in _common.kernel_parameters(fn)]
    assert sig["keys_ptr"] == "*bf16" and sig["acc_ptr"] == "*fp32" and sig["d_model"] == "i32"
    with pytest.raises(ValueError, match="missing"):
        _aot.signature(fn, {k: v for k, v in cx.items() if k != "LAST"}, {}, "*bf16")
    with pytest.raises(ValueError, match="unknown"):
        _aot.signature(fn, dict(cx, BLOCK_K=32), {}, "*bf16")


def test_configs_describe_themselves():
    for kernel in _configs.KERNELS:
        names = set(_configs.meta_names(kernel))
        for cfg in _configs.configs(kernel, interpret=False):
            assert set(cfg.kwargs) == names, (kernel, cfg.name)
            assert all(v > 0 for v in cfg.kwargs.values()), (kernel, cfg.name)
            assert cfg.dot in ("mma", "fma")
        for dot, elem in (("mma", 2), ("mma", 4), ("fma", 4)):
            for G in (16, 32, 64, 128, 256):
                for load_a in (True, False):
                    kept = _configs.launch_configs(kernel, dot, G, elem, load_a,
                                                   interpret=False)
                    assert kept and all(c.dot == dot for c in kept), (kernel, dot, G)
                    # Every launch has a config that fits (no last-resort fallback).
                    assert all(_configs.fits(kernel, c, G, elem, load_a) for c in kept), (
                        kernel, dot, G, load_a)


def test_autotune_keys_hold_every_untuned_constexpr():
    """A config tuned for one variant is never reused for another: the key holds DOT_PREC and
    every other constexpr that changes the compiled code."""
    from sfnn.triton_kernels import avgk_topk, block_means, gated_ffn

    kernels = [block_ffn._block_ffn_fwd_kernel, block_ffn._block_ffn_pre_kernel,
               block_ffn._block_ffn_out_kernel, block_ffn._block_ffn_dh_kernel,
               block_ffn._block_ffn_dx_kernel, block_ffn._block_ffn_dw_kernel,
               gated_ffn._gated_fwd_kernel, gated_ffn._gated_pre_kernel,
               gated_ffn._gated_out_kernel, gated_ffn._gated_dh_kernel,
               gated_ffn._gated_dx_kernel, avgk_topk._avgk_topk_kernel,
               block_means._block_means_kernel]
    for k in kernels:
        tuner = k
        while not isinstance(tuner, block_ffn.triton.runtime.Autotuner):
            tuner = tuner.fn
        tuned = {n for c in tuner.configs for n in c.kwargs}
        consts = {n for n, is_c in _common.kernel_parameters(k) if is_c} - tuned
        assert consts <= set(tuner.keys), (k, consts - set(tuner.keys))
        assert "DOT_PREC" in tuner.keys or "DOT_PRECISION" in tuner.keys or \
            k is block_means._block_means_kernel


def test_every_launcher_guards_its_device(monkeypatch):
    from sfnn.triton_kernels import avgk_topk, block_means, gated_ffn

    for f in (block_ffn.block_ffn_fwd, block_ffn.block_ffn_bwd, block_ffn.plain_ffn_fwd,
              block_ffn.plain_ffn_bwd, gated_ffn.gated_ffn_fwd, gated_ffn.gated_ffn_bwd,
              avgk_topk.avgk_topk, block_means.block_means):
        assert getattr(f, "device_guarded", False), f.__name__
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: seen.append(dev) or _Null())

    class Fake:
        device = torch.device("cuda", 1)

    with _common.device_guard(Fake()):
        pass
    assert seen == [torch.device("cuda", 1)]
    with _common.device_guard(torch.empty(1)):
        pass
    assert len(seen) == 1


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_on_the_tensors_device():
    """Tensors on the last GPU while GPU 0 is current: the kernels run where the tensors are."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    p = _problem(100, 64, 32, 8, 3, dtype=torch.bfloat16, device=dev, mode="hot")
    out = _check(p, g=32, activation="gelu", deterministic=False)
    assert all(t is None or t.device == dev for t in out)
    assert torch.cuda.current_device() == 0


@needs_cuda
@pytest.mark.cuda
def test_no_host_sync_cuda():
    p = _problem(300, 64, 32, 8, 3, dtype=torch.bfloat16, device="cuda")
    _triton(p, g=32, activation="gelu", deterministic=False)  # compile and tune first
    _triton(p, g=32, activation="gelu", deterministic=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _triton(p, g=32, activation="gelu", deterministic=False)
        _triton(p, g=32, activation="gelu", deterministic=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_large_cuda(deterministic):
    """70,000 tokens at d_model 4096: past 65,536 rows, so any int32 stride product overflows."""
    p = _problem(70_000, 4096, 64, 16, 2, dtype=torch.bfloat16, device="cuda", mode="hot")
    _check(p, g=64, activation="gelu", deterministic=deterministic)
