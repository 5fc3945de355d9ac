"""The layer's contract on the CPU: edge cases, autocast, no_grad, module (block-means caching:
test_block_means_cache.py)."""
from __future__ import annotations

import pytest
import torch
from _cases import make_problem
from torch import nn

import sfnn
from sfnn import torch_path
from sfnn.reference import sparse_ffn_ref
from sfnn.testing import assert_close

ACTS = ["relu", "gelu", "silu"]


def _ffn(x, keys, values, kb=None, ob=None, **kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("top_k", 2)
    return sfnn.sparse_ffn(x, keys, values, key_bias=kb, out_bias=ob, **kw)


@pytest.mark.parametrize("act", ACTS)
def test_from_dense_equals_dense_ffn_at_full_density(act):
    d_model, d_ff = 24, 96
    fc1, fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
    dense_act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]
    ffn = sfnn.SparseFFN.from_dense(fc1, fc2, block_size=16, top_k=6, activation=act)
    x = torch.randn(5, 7, d_model, requires_grad=True)
    y = ffn(x)
    x2 = x.detach().clone().requires_grad_()
    y_dense = fc2(dense_act(fc1(x2)))
    assert_close(y, y_dense, name="y")
    y.sum().backward()
    y_dense.sum().backward()
    assert_close(x.grad, x2.grad, name="dx")
    assert_close(ffn.key_weight.grad, fc1.weight.grad, name="dkeys")
    assert_close(ffn.value_weight.grad, fc2.weight.grad.t(), name="dvalues")
    assert_close(ffn.key_bias.grad, fc1.bias.grad, name="dkey_bias")
    assert_close(ffn.out_bias.grad, fc2.bias.grad, name="dout_bias")


def test_from_dense_without_bias_and_bad_layers():
    fc1, fc2 = nn.Linear(8, 32, bias=False), nn.Linear(32, 8)
    ffn = sfnn.SparseFFN.from_dense(fc1, fc2, block_size=8, top_k=2)
    assert ffn.key_bias is None and ffn.out_bias is not None
    assert ffn(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match="fc2"):
        sfnn.SparseFFN.from_dense(nn.Linear(8, 32), nn.Linear(16, 8), block_size=8, top_k=2)
    with pytest.raises(TypeError):
        sfnn.SparseFFN.from_dense(fc1, "fc2", block_size=8, top_k=2)


def test_module_initialisation_matches_linear():
    torch.manual_seed(0)
    ffn = sfnn.SparseFFN(256, 1024, block_size=64, top_k=4)
    b1, b2 = 256 ** -0.5, 1024 ** -0.5
    tables = ((ffn.key_weight, b1), (ffn.key_bias, b1), (ffn.value_weight, b2), (ffn.out_bias, b2))
    for p, bound in tables:
        p = p.detach()
        assert float(p.abs().max()) <= bound
        assert float(p.abs().max()) > 0.95 * bound  # uniform over the whole range
        assert abs(float(p.std()) - bound / 3 ** 0.5) < 0.05 * bound
    assert sfnn.SparseFFN(8, 32, block_size=8, top_k=1, bias=False).key_bias is None
    assert "block_size=64" in repr(ffn)


@pytest.mark.parametrize("shape", [(0, 24), (2, 0, 24), (0, 3, 24)])
def test_empty_batches(shape):
    _, keys, values, kb, ob = make_problem(1, 24, 64, requires_grad=True)
    x = torch.randn(shape, requires_grad=True)
    y = _ffn(x, keys, values, kb, ob)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert float(keys.grad.abs().sum()) == 0.0 and float(ob.grad.abs().sum()) == 0.0


def test_leading_dims_and_non_contiguous_x():
    x, keys, values, kb, ob = make_problem(60, 24, 64)
    x4 = x.view(3, 4, 5, 24)
    y4 = _ffn(x4, keys, values, kb, ob)
    assert y4.shape == (3, 4, 5, 24)
    assert torch.equal(y4.reshape(60, 24), _ffn(x, keys, values, kb, ob))
    xt = x4.transpose(0, 2)  # non-contiguous view
    assert not xt.is_contiguous()
    assert_close(_ffn(xt, keys, values, kb, ob), _ffn(xt.contiguous(), keys, values, kb, ob))
    x1 = x[0]  # a single token, no leading dims
    assert_close(_ffn(x1, keys, values, kb, ob), _ffn(x[:1], keys, values, kb, ob)[0])


def test_top_k_equal_n_blocks_is_the_dense_ffn():
    x, keys, values, kb, ob = make_problem(33, 20, 80)
    y = _ffn(x, keys, values, kb, ob, top_k=5, activation="gelu")
    dense = torch.nn.functional.gelu(x @ keys.t() + kb) @ values + ob
    assert_close(y, dense)


def test_more_than_65536_tokens():
    T = 70_001
    x, keys, values, kb, ob = make_problem(T, 16, 64)
    y = _ffn(x, keys, values, kb, ob, top_k=2)
    ref = sparse_ffn_ref(x, keys, values, block_size=16, top_k=2, key_bias=kb, out_bias=ob)
    assert_close(y, ref, name="y")
    assert_close(y[-5:], _ffn(x[-5:], keys, values, kb, ob, top_k=2), name="last tokens")


def test_nan_token_only_poisons_itself():
    x, keys, values, kb, ob = make_problem(40, 24, 64, requires_grad=True)
    clean = _ffn(x, keys, values, kb, ob).detach()
    x_nan = x.detach().clone()
    x_nan[7, 3] = float("nan")
    y = _ffn(x_nan, keys, values, kb, ob)
    assert torch.isnan(y[7]).all()
    others = torch.arange(40) != 7
    assert torch.equal(y[others], clean[others])


def test_no_grad_keeps_nothing_for_backward(monkeypatch):
    """Only a call that records a gradient saves for the backward; the others take the fused
    inference step (which saves nothing) or the forward with save_for_backward=False."""
    seen = []
    real, real_fused = torch_path.block_ffn_fwd, torch_path.avgk_ffn_fwd

    def spy(*args, **kwargs):
        seen.append(kwargs["save_for_backward"])
        return real(*args, **kwargs)

    def spy_fused(*args, **kwargs):
        seen.append("fused")
        return real_fused(*args, **kwargs)

    monkeypatch.setattr(torch_path, "block_ffn_fwd", spy)
    monkeypatch.setattr(torch_path, "avgk_ffn_fwd", spy_fused)
    x, keys, values, kb, ob = make_problem(20, 16, 64, requires_grad=True)
    with torch.no_grad():
        y = _ffn(x, keys, values, kb, ob, backend="torch")
    assert y.grad_fn is None and seen[0] == "fused" and True not in seen, seen
    seen.clear()
    y = _ffn(x, keys, values, kb, ob, backend="torch")
    assert y.grad_fn is not None and seen == [True]
    seen.clear()
    y = _ffn(x.detach(), keys.detach(), values.detach(), kb.detach(), ob.detach(), backend="torch")
    assert y.grad_fn is None and seen[0] == "fused" and True not in seen, seen


def test_training_step_updates_selection():
    """Two optimizer steps: the cached means must follow the parameters."""
    torch.manual_seed(1)
    ffn = sfnn.SparseFFN(12, 48, block_size=12, top_k=2, activation="silu")
    opt = torch.optim.SGD(ffn.parameters(), lr=0.5)
    x = torch.randn(30, 12)
    for _ in range(3):
        opt.zero_grad()
        ffn(x).pow(2).mean().backward()
        opt.step()
        ref = sparse_ffn_ref(x, ffn.key_weight, ffn.value_weight, block_size=12, top_k=2,
                             key_bias=ffn.key_bias, out_bias=ffn.out_bias, activation="silu")
        assert_close(ffn(x), ref)


def test_deterministic_flag_is_bitwise_repeatable():
    x, keys, values, kb, ob = make_problem(64, 24, 96, requires_grad=True)
    outs = []
    for _ in range(2):
        y = _ffn(x, keys, values, kb, ob, deterministic=True)
        y.backward(torch.ones_like(y))
        outs.append((y.detach().clone(), x.grad.clone(), keys.grad.clone()))
        x.grad = keys.grad = values.grad = kb.grad = ob.grad = None
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_autocast_follows_linear():
    ffn = sfnn.SparseFFN(32, 128, block_size=16, top_k=3, activation="gelu")
    lin = nn.Linear(32, 32)
    x = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
        y_lin = lin(x)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    ref = sparse_ffn_ref(x.bfloat16().double(), ffn.key_weight.bfloat16().double(),
                         ffn.value_weight.bfloat16().double(), block_size=16, top_k=3,
                         key_bias=ffn.key_bias.bfloat16().double(),
                         out_bias=ffn.out_bias.bfloat16().double(), activation="gelu")
    assert_close(y, ref, name="y")
    y.float().sum().backward()
    assert ffn.key_weight.grad.dtype == torch.float32 and ffn.key_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_end_to_end(dtype):
    x, keys, values, kb, ob = make_problem(50, 32, 128, dtype=dtype)
    y = _ffn(x, keys, values, kb, ob, activation="silu")
    assert y.dtype == dtype
    ref = sparse_ffn_ref(*[t.double() for t in (x, keys, values)], block_size=16, top_k=2,
                         key_bias=kb.double(), out_bias=ob.double(), activation="silu")
    assert_close(y, ref)


def test_reference_backend_matches_torch():
    x, keys, values, kb, ob = make_problem(30, 16, 64)
    assert_close(_ffn(x, keys, values, kb, ob, backend="reference"),
                 _ffn(x, keys, values, kb, ob, backend="torch"))


def test_weight_norm_and_parametrizations_work_on_the_tables():
    """The tables are not called keys/values: parametrize keeps a ModuleDict keyed by name,
    and ModuleDict.keys/values would collide ("attribute 'keys' already exists")."""
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2)
    x = torch.randn(5, 16)
    before = ffn(x)
    torch.nn.utils.parametrizations.weight_norm(ffn, "key_weight", dim=0)
    torch.nn.utils.parametrizations.weight_norm(ffn, "value_weight", dim=0)
    assert_close(ffn(x), before, name="y after weight_norm")
    ffn(x).sum().backward()
    original0 = ffn.parametrizations.key_weight.original0
    assert original0.grad is not None and float(original0.grad.abs().sum()) > 0


def test_legacy_state_dict_names_load():
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2)
    legacy = {("keys" if k == "key_weight" else "values" if k == "value_weight" else k): v
              for k, v in ffn.state_dict().items()}
    assert "keys" in legacy and "key_weight" not in legacy
    other = sfnn.SparseFFN(16, 64, block_size=8, top_k=2)
    other.load_state_dict(legacy)
    assert torch.equal(other.key_weight, ffn.key_weight)
    assert torch.equal(other.value_weight, ffn.value_weight)


def test_extra_repr_names_each_bias():
    ffn = sfnn.SparseFFN(8, 32, block_size=8, top_k=1)
    ffn.out_bias = None
    text = repr(ffn)
    assert "key_bias=True" in text and "out_bias=False" in text


@pytest.mark.parametrize("frozen", ["keys", "values", "x", "key_bias"])
def test_backward_computes_only_the_gradients_asked_for(monkeypatch, frozen):
    """Fine-tuning with a frozen table must not pay for its gradient (needs_input_grad)."""
    seen = []
    real = torch_path.block_ffn_bwd

    def spy(*args, **kwargs):
        seen.append(kwargs["needs"])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_path, "block_ffn_bwd", spy)
    x, keys, values, kb, ob = make_problem(20, 16, 64)
    named = dict(x=x, keys=keys, values=values, key_bias=kb)
    for name, t in named.items():
        t.requires_grad_(name != frozen)
    y = _ffn(x, keys, values, kb, ob, backend="torch", activation="gelu")
    y.square().sum().backward()
    expected = tuple(name != frozen for name in ("x", "keys", "values", "key_bias")) + (False,) * 3
    assert seen == [expected]
    refs = {n: t.detach().clone().requires_grad_(n != frozen) for n, t in named.items()}
    ref = sparse_ffn_ref(refs["x"], refs["keys"], refs["values"], block_size=16, top_k=2,
                         key_bias=refs["key_bias"], out_bias=ob, activation="gelu")
    ref.square().sum().backward()
    for name, t in named.items():
        if name == frozen:
            assert t.grad is None
        else:
            assert_close(t.grad, refs[name].grad, name=f"d{name}")
