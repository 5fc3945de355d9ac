"""The gated Triton block-FFN launchers (issue 11's protocol) against a dense gated oracle.

``h = act(x kg^T + bg) * (x ku^T + bu)`` over the selected blocks, ``y = sum h v + out_bias``:
the oracle below computes it densely in float64 with a (token, cell) weight mask built from the
indices (and the selection gates), and autograd gives all seven gradients. Both combine schedules
and both combine modes, save or recompute, every activation, bias and gate setting. Without a GPU
the kernels run in Triton's interpreter (small shapes).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot run")

from sfnn.triton_kernels import _common, _configs, block_ffn, gated_ffn  # noqa: E402
from sfnn.triton_kernels.block_ffn import block_ffn_bwd, block_ffn_fwd  # noqa: E402

from sfnn.testing import TOLERANCES, assert_close  # noqa: E402

SLICE = 32 if _common.INTERPRET else _configs.max_block_d()
NAMES = ("y", "dx", "dkeys", "dvalues", "dkey_bias", "dgates", "dgate_keys", "dgate_bias")
ACTS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def _problem(T, d, g, n_blocks, top_k, *, dtype, device, bias=True, gates=True, dup=False,
             seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_ff = g * n_blocks

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    if dup:
        idx = torch.randint(0, n_blocks, (T, top_k), generator=gen)
        idx[:, -1] = idx[:, 0]
    else:
        idx = torch.stack([torch.randperm(n_blocks, generator=gen)[:top_k] for _ in range(T)])
    return dict(
        x=rnd(T, d), keys=rnd(d_ff, d, scale=d**-0.5), gate_keys=rnd(d_ff, d, scale=d**-0.5),
        values=rnd(d_ff, d, scale=(top_k * g) ** -0.5),
        indices=idx.to(torch.int32).to(device),
        key_bias=rnd(d_ff, scale=0.5) if bias else None,
        gate_bias=rnd(d_ff, scale=0.5) if bias else None,
        out_bias=rnd(d, scale=0.5) if bias else None,
        gates=(torch.rand(T, top_k, generator=gen) + 0.25).to(device) if gates else None,
        dy=rnd(T, d),
    )


def _oracle(p, *, g, activation):
    """Dense gated FFN in float64, weighted per (token, cell) by how often (and with which
    selection gate) the token chose the cell's block: y and the seven gradients."""
    names = ("x", "keys", "values", "key_bias", "gates", "gate_keys", "gate_bias", "out_bias")
    ins = {n: None if p[n] is None else p[n].detach().cpu().double().requires_grad_()
           for n in names}
    T, top_k = p["indices"].shape
    d_ff = p["keys"].shape[0]
    idx = p["indices"].long().cpu()
    w = ins["gates"] if ins["gates"] is not None else torch.ones(T, top_k, dtype=torch.float64)
    cell_block = torch.arange(d_ff) // g  # (d_ff,)
    mask = ((idx[:, :, None] == cell_block[None, None, :]) * w[:, :, None]).sum(1)  # (T, d_ff)
    a_gate = ins["x"] @ ins["gate_keys"].T
    a_up = ins["x"] @ ins["keys"].T
    if ins["gate_bias"] is not None:
        a_gate = a_gate + ins["gate_bias"]
        a_up = a_up + ins["key_bias"]
    y = (ACTS[activation](a_gate) * a_up * mask) @ ins["values"]
    if ins["out_bias"] is not None:
        y = y + ins["out_bias"]
    y.backward(p["dy"].cpu().double())
    grad = lambda n: None if ins[n] is None else ins[n].grad
    return (y, grad("x"), grad("keys"), grad("values"), grad("key_bias"), grad("gates"),
            grad("gate_keys"), grad("gate_bias"))


def _triton(p, *, g, activation, deterministic, schedule, save=True, needs=(True,) * 7):
    slice_d = SLICE if schedule == "slice" else None
    y, saved, route = block_ffn_fwd(
        p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["out_bias"], p["gates"],
        block_size=g, activation=activation, save_for_backward=save, deterministic=deterministic,
        schedule=schedule, slice_d=slice_d, gate_keys=p["gate_keys"], gate_bias=p["gate_bias"])
    if save:
        assert saved.shape == (p["x"].shape[0] * p["indices"].shape[1], 2 * g)
    grads = block_ffn_bwd(
        p["dy"], p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["gates"], saved,
        route, block_size=g, activation=activation, deterministic=deterministic, needs=needs,
        schedule=schedule, slice_d=slice_d, gate_keys=p["gate_keys"], gate_bias=p["gate_bias"])
    assert len(grads) == 7
    return (y, *grads)


def _check(p, **kw):
    out = _triton(p, **kw)
    ref = _oracle(p, g=kw["g"], activation=kw["activation"])
    atol, rtol = TOLERANCES[p["x"].dtype]
    for name, a, e in zip(NAMES, out, ref, strict=True):
        if e is None:
            assert a is None, f"{name} should be None"
            continue
        assert a.dtype == (torch.float32 if name == "dgates" else p["x"].dtype), name
        assert_close(a.cpu(), e, atol=atol, rtol=rtol, name=name)
    return out


# T, d, g, n_blocks, top_k, deterministic, schedule, activation, save, bias, gates, dup: each
# combine mode meets both schedules; g below 16 / not a power of two; top_k 1 (no combine).
CASES = [
    pytest.param(37, 40, 24, 5, 3, False, "tile", "silu", True, True, True, False,
                 id="atomic-tile-silu"),
    pytest.param(37, 40, 24, 5, 3, True, "slice", "silu", True, True, True, False,
                 id="det-slice-silu"),
    pytest.param(29, 72, 16, 4, 2, False, "slice", "gelu", False, False, True, True,
                 id="atomic-slice-gelu-recompute-nobias-dup"),
    pytest.param(33, 24, 8, 6, 2, True, "tile", "relu", True, True, False, False,
                 id="det-tile-relu-nogates"),
    pytest.param(20, 32, 16, 4, 1, False, "tile", "gelu", True, True, True, False,
                 id="k1-tile"),
]


@pytest.mark.parametrize("T,d,g,nb,k,det,schedule,act,save,bias,gates,dup", CASES)
def test_gated_against_oracle(T, d, g, nb, k, det, schedule, act, save, bias, gates, dup,
                              device):
    p = _problem(T, d, g, nb, k, dtype=torch.float32, device=device, bias=bias, gates=gates,
                 dup=dup, seed=T)
    _check(p, g=g, activation=act, deterministic=det, schedule=schedule, save=save)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_gated_half(dtype, device):
    p = _problem(41, 48, 16, 5, 3, dtype=dtype, device=device, seed=3)
    _check(p, g=16, activation="silu", deterministic=False, schedule="slice")


def test_gated_deterministic_is_bitwise_repeatable(device):
    p = _problem(26, 40, 16, 4, 3, dtype=torch.bfloat16, device=device, seed=4)
    first = _triton(p, g=16, activation="gelu", deterministic=True, schedule="tile")
    second = _triton(p, g=16, activation="gelu", deterministic=True, schedule="tile")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_gated_needs_skips_work(device, monkeypatch):
    """Only the gate table's gradients: dh and the one dW launch for gate_keys/gate_bias run,
    and they equal the full backward's."""
    p = _problem(24, 32, 16, 4, 2, dtype=torch.float32, device=device, seed=5)
    full = _triton(p, g=16, activation="silu", deterministic=True, schedule="tile")
    launched = []
    real = block_ffn._launch

    def spy(kernel, kind, *args, **kwargs):
        launched.append(kind)
        return real(kernel, kind, *args, **kwargs)

    monkeypatch.setattr(block_ffn, "_launch", spy)
    monkeypatch.setattr(gated_ffn, "_launch", spy)
    needs = (False, False, False, False, False, True, True)
    out = _triton(p, g=16, activation="silu", deterministic=True, schedule="tile", needs=needs)
    assert launched[-2:] == ["dh", "dw"] and "dx" not in launched, launched
    for i, need in enumerate(needs):
        if need:
            assert torch.equal(out[1 + i], full[1 + i]), NAMES[1 + i]
        else:
            assert out[1 + i] is None, NAMES[1 + i]
    none = _triton(p, g=16, activation="silu", deterministic=True, schedule="tile",
                   needs=(False,) * 7)
    assert all(t is None for t in none[1:])


def test_plain_backward_follows_the_length_of_needs(device):
    """The backend protocol: 5 gradients for 5 flags, 7 (the gate table's None) for 7."""
    p = _problem(12, 16, 16, 2, 1, dtype=torch.float32, device=device, seed=6)
    y, saved, route = block_ffn_fwd(p["x"], p["keys"], p["values"], p["indices"], None, None,
                                    None, block_size=16, activation="relu",
                                    save_for_backward=True, deterministic=False)
    args = (p["dy"], p["x"], p["keys"], p["values"], p["indices"], None, None, saved, route)
    kw = dict(block_size=16, activation="relu", deterministic=False)
    five = block_ffn_bwd(*args, **kw, needs=(True,) * 5)
    seven = block_ffn_bwd(*args, **kw, needs=(True,) * 7)
    assert len(five) == 5 and len(seven) == 7 and seven[5:] == (None, None)
    for a, b in zip(five, seven[:5], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(AssertionError, match="gate_bias without gate_keys"):
        block_ffn_fwd(p["x"], p["keys"], p["values"], p["indices"], None, None, None,
                      block_size=16, activation="relu", save_for_backward=False,
                      deterministic=False, gate_bias=p["gate_bias"])


def test_gated_block_limits_follow_the_compiled_kernels():
    """Two [BLOCK_T, G] accumulators spill past g=128 (bench/aot_check.py): the fused gated
    forward is not offered there and the pre-activation kernel runs in cell chunks."""
    for dot, elem in (("mma", 2), ("mma", 4)):
        assert _configs.gated_fused_fits(dot, 128, elem, interpret=False)
        assert not _configs.gated_fused_fits(dot, 256, elem, interpret=False)
        assert _configs.gated_pre_cells(dot, 256, elem, interpret=False) == 128
        assert _configs.gated_pre_cells(dot, 64, elem, interpret=False) == 64
    assert _configs.gated_pre_cells("fma", 256, 4, interpret=False) == 64
    assert _configs.gated_dx_fits("mma", 256, 2, interpret=False)
    assert not _configs.gated_dx_fits("mma", 256, 4, interpret=False)  # fp32: shared memory
    assert all(c.num_warps == 8 for c in _configs.launch_configs(
        "fwd", "mma", 64, 2, interpret=False, gated=True))


def test_gated_forward_without_a_fused_config_runs_the_slices(device, monkeypatch):
    """Where no fused config fits (g=256 on a GPU), the gated forward takes the slice schedule
    (pre-activation, then output kernel) whatever it was asked for, and stays correct."""
    p = _problem(21, 40, 24, 3, 2, dtype=torch.float32, device=device, seed=8)
    launched = []
    real = block_ffn._launch

    def spy(kernel, kind, *args, **kwargs):
        launched.append(kind)
        return real(kernel, kind, *args, **kwargs)

    monkeypatch.setattr(gated_ffn, "_launch", spy)
    monkeypatch.setattr(_configs, "gated_fused_fits", lambda *a, **k: False)
    _check(p, g=24, activation="gelu", deterministic=False, schedule="tile")
    assert launched[:2] == ["pre", "out"] and "fwd" not in launched, launched


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_gated_dx_without_a_config_runs_the_plain_kernel_twice(deterministic, device,
                                                                 monkeypatch):
    """Where no gated dx config fits (fp32 at g=256 on a GPU: shared memory), dx is the plain
    dx kernel over dAg and gate_keys, then over dAu and keys, into one combine."""
    p = _problem(22, 40, 16, 4, 3, dtype=torch.float32, device=device, seed=9)
    launched = []
    real = block_ffn._launch

    def spy(kernel, kind, *args, **kwargs):
        launched.append((kind, kwargs.get("gated", False)))
        return real(kernel, kind, *args, **kwargs)

    monkeypatch.setattr(gated_ffn, "_launch", spy)
    monkeypatch.setattr(_configs, "gated_dx_fits", lambda *a, **k: False)
    _check(p, g=16, activation="silu", deterministic=deterministic, schedule="slice")
    plain_dx = [k for k in launched if k == ("dx", False)]
    assert len(plain_dx) == 2 * (3 if deterministic else 1), launched
    assert ("dx", True) not in launched


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_layer_through_the_op_layer_matches_the_reference(activation, device):
    """sfnn.sparse_ffn(gate_keys=..., backend="triton"): Avg-K on the gate table, the gated
    kernels through the registered op and its autograd, every gradient against the
    dense-masked reference."""
    import sfnn

    T, d, g, nb, k = 5, 32, 16, 6, 2
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device).requires_grad_()

    args = dict(x=rnd(T, d), keys=rnd(g * nb, d, scale=d**-0.5),
                values=rnd(g * nb, d, scale=(k * g) ** -0.5))
    opts = dict(key_bias=rnd(g * nb, scale=0.5), out_bias=rnd(d, scale=0.5),
                gate_keys=rnd(g * nb, d, scale=d**-0.5), gate_bias=rnd(g * nb, scale=0.5))
    tensors = list(args.values()) + list(opts.values())
    dy = torch.randn(T, d, generator=gen).to(device)
    out = {}
    for backend in ("triton", "reference"):
        y = sfnn.sparse_ffn(*args.values(), block_size=g, top_k=k, activation=activation,
                            backend=backend, **opts)
        out[backend] = (y, *torch.autograd.grad(y, tensors, dy))
    for name, got, want in zip(("y", *args, *opts), out["triton"], out["reference"],
                               strict=True):
        assert_close(got, want, atol=1e-4, rtol=1e-4, name=name)
    ffn = sfnn.SparseFFN(d, g * nb, block_size=g, top_k=k, gated=True, activation=activation,
                         backend="triton").to(device)
    ref = sfnn.SparseFFN(d, g * nb, block_size=g, top_k=k, gated=True, activation=activation,
                         backend="reference").to(device)
    ref.load_state_dict(ffn.state_dict())
    x = torch.randn(T, d, generator=gen).to(device)
    assert_close(ffn(x), ref(x), atol=1e-4, rtol=1e-4, name="SparseFFN(gated=True)")
