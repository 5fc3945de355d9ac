"""Every available backend against the dense-masked reference: outputs and all gradients."""
from __future__ import annotations

import pytest
import torch
from _cases import backend_device, grads, make_problem, upcast
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfnn
from sfnn import ops
from sfnn.reference import block_ffn_ref, select_blocks_ref, sparse_ffn_ref
from sfnn.testing import TOLERANCES, assert_close

ACTS = ["relu", "gelu", "silu"]


def available_backends():
    out = ["torch"]
    if ops.triton_import_error() is None:
        out.append("triton")
    return out


def _random_indices(T, top_k, n_blocks, *, device="cpu", distinct=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if distinct:
        idx = torch.stack([torch.randperm(n_blocks, generator=g)[:top_k] for _ in range(T)])
    else:
        idx = torch.randint(0, n_blocks, (T, top_k), generator=g)
    return idx.to(device=device, dtype=torch.int32)


def check_block_ffn(backend, T, d_model, d_ff, g, top_k, *, act, bias, gated, dtype,
                    device="cpu", distinct=True):
    """block_ffn on ``backend`` against block_ffn_ref in float64: y and every gradient."""
    x, keys, values, kb, ob = make_problem(T, d_model, d_ff, bias=bias, dtype=dtype, device=device,
                                           requires_grad=True)
    idx = _random_indices(T, top_k, d_ff // g, device=device, distinct=distinct)
    gates = None
    if gated:
        gdtype = torch.float64 if dtype == torch.float64 else torch.float32
        gates = torch.rand(T, top_k, device=device, dtype=gdtype).requires_grad_()
    y = sfnn.block_ffn(x, keys, values, idx, block_size=g, key_bias=kb, out_bias=ob, gates=gates,
                       activation=act, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_inputs = upcast(x, keys, values, kb, ob, gates)
    xr, kr, vr, kbr, obr, gr = ref_inputs
    yr = block_ffn_ref(xr, kr, vr, idx, block_size=g, key_bias=kbr, out_bias=obr, gates=gr,
                       activation=act)
    yr.backward(dy.double())
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (T, d_model)
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    names = ["dx", "dkeys", "dvalues", "dkey_bias", "dout_bias", "dgates"]
    pairs = zip(names, grads(x, keys, values, kb, ob, gates), grads(*ref_inputs), strict=True)
    for name, got, want in pairs:
        if want is None and got is None:
            continue
        # Gradients sum over tokens: scale the tolerance with the problem size in low precision.
        scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
        assert_close(got, want, atol=atol * scale, rtol=rtol * scale, name=name)


SHAPES = [  # T, d_model, d_ff, g, top_k
    pytest.param((37, 24, 96, 16, 2), id="T37-d24-g16-k2"),
    pytest.param((50, 33, 120, 8, 5), id="T50-d33-g8-k5-nb15"),
    pytest.param((19, 16, 64, 16, 1), id="T19-d16-g16-k1"),
    pytest.param((23, 20, 48, 16, 3), id="T23-d20-g16-k3-all"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [False, True], ids=["nogate", "gate"])
def test_block_ffn_torch_fp32(shape, act, bias, gated):
    check_block_ffn("torch", *shape, act=act, bias=bias, gated=gated, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp16", "bf16", "fp64"])
@pytest.mark.parametrize("act", ACTS)
def test_block_ffn_torch_dtypes(dtype, act):
    check_block_ffn("torch", 41, 24, 96, 16, 3, act=act, bias=True, gated=True, dtype=dtype)


def test_block_ffn_duplicate_indices_count_twice():
    check_block_ffn("torch", 40, 16, 64, 16, 3, act="gelu", bias=True, gated=True,
                    dtype=torch.float32, distinct=False)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse_ffn_end_to_end(backend, act, bias):
    """The whole layer (means, selection, compute) against the reference, with all gradients."""
    T, d_model, d_ff, g, k = 45, 32, 160, 16, 3
    x, keys, values, kb, ob = make_problem(T, d_model, d_ff, bias=bias, requires_grad=True,
                                           device=backend_device(backend))
    y = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=k, key_bias=kb, out_bias=ob,
                        activation=act, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_inputs = upcast(*[None if t is None else t.cpu() for t in (x, keys, values, kb, ob)])
    xr, kr, vr, kbr, obr = ref_inputs
    yr = sparse_ffn_ref(xr, kr, vr, block_size=g, top_k=k, key_bias=kbr, out_bias=obr,
                        activation=act)
    yr.backward(dy.double().cpu())
    assert_close(y, yr, name="y")
    for name, got, want in zip(["dx", "dkeys", "dvalues", "dkey_bias", "dout_bias"],
                               grads(x, keys, values, kb, ob), grads(*ref_inputs), strict=True):
        if want is not None:
            assert_close(got, want, name=name)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("top_k", [1, 3, 7, 10])
def test_selection_matches_reference(backend, top_k):
    T, d_model, n_blocks = 61, 40, 10
    x = torch.randn(T, d_model)
    kbar, bbar = torch.randn(n_blocks, d_model), torch.randn(n_blocks)
    dev = backend_device(backend)
    idx = sfnn.select_blocks(x.to(dev), kbar.to(dev), bbar.to(dev), top_k, backend=backend).cpu()
    assert idx.dtype == torch.int32 and idx.shape == (T, top_k)
    assert torch.equal(idx, select_blocks_ref(x, kbar, bbar, top_k))


@pytest.mark.parametrize("backend", available_backends())
def test_selection_ties_go_to_smaller_index(backend):
    kbar = torch.zeros(12, 16)
    kbar[[2, 5, 9]] = 1.0  # three equal best blocks; the rest tie at zero
    x = torch.ones(4, 16)
    dev = backend_device(backend)
    idx = sfnn.select_blocks(x.to(dev), kbar.to(dev), None, 5, backend=backend).cpu()
    assert idx.tolist() == [[2, 5, 9, 0, 1]] * 4


def test_block_means_match_reference_and_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        keys, kb = torch.randn(96, 24).to(dtype), torch.randn(96).to(dtype)
        kbar, bbar = sfnn.block_means(keys, kb, block_size=16, backend="torch")
        rk, rb = sfnn.block_means(keys, kb, block_size=16, backend="reference")
        assert kbar.dtype == bbar.dtype == torch.float32
        assert_close(kbar, rk, atol=1e-6, rtol=1e-6, name="kbar")
        assert_close(bbar, rb, atol=1e-6, rtol=1e-6, name="bbar")
    kbar, bbar = sfnn.block_means(keys, None, block_size=16)
    assert bbar is None and kbar.shape == (6, 24)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("top_k", [1, 5], ids=["k1", "kall"])
def test_gradcheck_float64(act, bias, top_k):
    """Finite differences in float64 through the whole torch path (5 blocks of 3 cells)."""
    x, keys, values, kb, ob = make_problem(7, 6, 15, bias=bias, dtype=torch.float64,
                                           requires_grad=True)
    inputs = tuple(t for t in (x, keys, values, kb, ob) if t is not None)

    def f(*args):
        x, keys, values, *rest = args
        kb, ob = (rest if bias else (None, None))
        return sfnn.sparse_ffn(x, keys, values, block_size=3, top_k=top_k, key_bias=kb,
                               out_bias=ob, activation=act, backend="torch")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_gates_float64():
    x, keys, values, kb, ob = make_problem(9, 5, 12, dtype=torch.float64, requires_grad=True)
    idx = _random_indices(9, 2, 4)
    gates = torch.rand(9, 2, dtype=torch.float64, requires_grad=True)

    def f(x, keys, values, kb, ob, gates):
        return sfnn.block_ffn(x, keys, values, idx, block_size=3, key_bias=kb, out_bias=ob,
                              gates=gates, activation="silu", backend="torch")

    assert torch.autograd.gradcheck(f, (x, keys, values, kb, ob, gates), eps=1e-6, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 40), d_model=st.integers(1, 24), g=st.integers(1, 12),
       n_blocks=st.integers(1, 9), data=st.data(), act=st.sampled_from(ACTS),
       bias=st.booleans(), gated=st.booleans())
def test_property_block_ffn_random_shapes(T, d_model, g, n_blocks, data, act, bias, gated):
    top_k = data.draw(st.integers(1, n_blocks))
    check_block_ffn("torch", T, d_model, g * n_blocks, g, top_k, act=act, bias=bias, gated=gated,
                    dtype=torch.float32)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 30), d_model=st.integers(1, 20), n_blocks=st.integers(1, 40),
       data=st.data())
def test_property_selection_random_shapes(T, d_model, n_blocks, data):
    top_k = data.draw(st.integers(1, n_blocks))
    x, kbar = torch.randn(T, d_model), torch.randn(n_blocks, d_model)
    bbar = torch.randn(n_blocks)
    idx = sfnn.select_blocks(x, kbar, bbar, top_k, backend="torch")
    assert torch.equal(idx, select_blocks_ref(x, kbar, bbar, top_k))


@pytest.mark.parametrize("backend", available_backends())
def test_selection_beyond_kernel_top_k(backend):
    """top_k above the Triton kernel's on-chip limit (64) still selects correctly."""
    T, d_model, n_blocks, top_k = 9, 16, 80, 70
    x = torch.randn(T, d_model)
    kbar, bbar = torch.randn(n_blocks, d_model), torch.randn(n_blocks)
    dev = backend_device(backend)
    idx = sfnn.select_blocks(x.to(dev), kbar.to(dev), bbar.to(dev), top_k, backend=backend).cpu()
    assert torch.equal(idx, select_blocks_ref(x, kbar, bbar, top_k))
