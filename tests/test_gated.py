"""Gated FFNs (issue 11: SwiGLU, GeGLU): the torch path against the dense-masked reference and
the dense gated FFN, every gradient (gradcheck in float64, subsets of ``needs``), random shapes,
the registered ops (opcheck; torch.compile is in test_compile.py), the module
(from_dense_gated, checkpoints), the selection methods' gates, backend routing and bad input."""
from __future__ import annotations

import io

import pytest
import torch
from _cases import grads, make_problem, upcast
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sfnn
from sfnn import ops, torch_path
from sfnn.reference import (
    block_ffn_ref,
    block_means_ref,
    dense_gated_ffn_ref,
    select_blocks_ref,
    sparse_ffn_ref,
)
from sfnn.selection import balanced_hash_table
from sfnn.testing import TOLERANCES, assert_close

ACTS = ["relu", "gelu", "silu"]


def gate_tables(d_ff, d_model, *, bias=True, dtype=torch.float32, requires_grad=False, seed=5):
    """A gate table (d_ff, d_model) and its bias (or None)."""
    gen = torch.Generator().manual_seed(seed + d_ff + d_model)
    gk = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    gb = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype) if bias else None
    return gk.requires_grad_(requires_grad), (None if gb is None else
                                              gb.requires_grad_(requires_grad))


def _indices(T, top_k, n_blocks, *, distinct=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        idx = torch.stack([torch.randperm(n_blocks, generator=gen)[:top_k] for _ in range(T)])
    else:
        idx = torch.randint(0, n_blocks, (T, top_k), generator=gen)
    return idx.to(torch.int32)


def check_gated_block_ffn(T, d_model, d_ff, g, top_k, *, act, bias, slot_gates, dtype,
                          distinct=True):
    """block_ffn(gate_keys=...) on the torch path against block_ffn_ref in float64: y and all
    eight gradients (x, up keys, values, up bias, out bias, slot gates, gate keys, gate bias)."""
    x, keys, values, kb, ob = make_problem(T, d_model, d_ff, bias=bias, dtype=dtype,
                                           requires_grad=True)
    gk, gb = gate_tables(d_ff, d_model, bias=bias, dtype=dtype, requires_grad=True)
    idx = _indices(T, top_k, d_ff // g, distinct=distinct)
    gates = None
    if slot_gates:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gates = torch.rand(T, top_k, dtype=acc).requires_grad_()
    y = sfnn.block_ffn(x, keys, values, idx, block_size=g, key_bias=kb, out_bias=ob,
                       gates=gates, activation=act, backend="torch", gate_keys=gk, gate_bias=gb)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_inputs = upcast(x, keys, values, kb, ob, gates, gk, gb)
    xr, kr, vr, kbr, obr, gr, gkr, gbr = ref_inputs
    yr = block_ffn_ref(xr, kr, vr, idx, block_size=g, key_bias=kbr, out_bias=obr, gates=gr,
                       activation=act, gate_keys=gkr, gate_bias=gbr)
    yr.backward(dy.double())
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (T, d_model)
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    names = ["dx", "dkeys", "dvalues", "dkey_bias", "dout_bias", "dgates", "dgate_keys",
             "dgate_bias"]
    scale = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    for name, got, want in zip(names, grads(x, keys, values, kb, ob, gates, gk, gb),
                               grads(*ref_inputs), strict=True):
        if want is None and got is None:
            continue
        assert got is not None, f"{name} missing"
        assert_close(got, want, atol=atol * scale, rtol=rtol * scale, name=name)


# -- the torch path against the reference ----------------------------------------------------

@pytest.fixture(params=["default", "pure-torch"])
def cpu_path(request, monkeypatch):
    """The torch path as it runs (with the CPU kernel when it is built), and its pure-PyTorch
    form (the chunked batched ops: what runs without a compiler and on CUDA tensors)."""
    if request.param == "pure-torch":
        monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: None)
    return request.param


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("slot_gates", [False, True], ids=["noslotgate", "slotgate"])
def test_gated_block_ffn_fp32(act, bias, slot_gates, cpu_path):
    check_gated_block_ffn(37, 24, 96, 16, 2, act=act, bias=bias, slot_gates=slot_gates,
                          dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=["fp16", "bf16", "fp64"])
def test_gated_block_ffn_dtypes(dtype, cpu_path):
    check_gated_block_ffn(29, 16, 64, 16, 3, act="silu", bias=True, slot_gates=True, dtype=dtype)


def test_gated_duplicate_indices_count_twice(cpu_path):
    check_gated_block_ffn(30, 16, 64, 16, 3, act="gelu", bias=True, slot_gates=True,
                          dtype=torch.float32, distinct=False)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 30), d_model=st.integers(1, 20), g=st.integers(1, 10),
       n_blocks=st.integers(1, 8), data=st.data(), act=st.sampled_from(ACTS),
       bias=st.booleans(), slot_gates=st.booleans())
def test_property_gated_block_ffn_random_shapes(T, d_model, g, n_blocks, data, act, bias,
                                                slot_gates):
    top_k = data.draw(st.integers(1, n_blocks))
    check_gated_block_ffn(T, d_model, g * n_blocks, g, top_k, act=act, bias=bias,
                          slot_gates=slot_gates, dtype=torch.float32)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 25), d_model=st.integers(1, 16), g=st.integers(1, 8),
       n_blocks=st.integers(1, 8), data=st.data(), act=st.sampled_from(ACTS),
       bias=st.booleans())
def test_property_gated_sparse_ffn_random_shapes(T, d_model, g, n_blocks, data, act, bias):
    """The whole gated layer (gate-mean selection and compute) on random shapes."""
    top_k = data.draw(st.integers(1, n_blocks))
    d_ff = g * n_blocks
    x, keys, values, kb, ob = make_problem(T, d_model, d_ff, bias=bias)
    gk, gb = gate_tables(d_ff, d_model, bias=bias)
    kw = dict(block_size=g, top_k=top_k, key_bias=kb, out_bias=ob, activation=act,
              gate_keys=gk, gate_bias=gb)
    y = sfnn.sparse_ffn(x, keys, values, backend="torch", **kw)
    yr = sparse_ffn_ref(x.double(), keys.double(), values.double(),
                        **{**kw, **{k: None if v is None else v.double()
                                    for k, v in kw.items() if k in ("key_bias", "out_bias",
                                                                   "gate_keys", "gate_bias")}})
    assert_close(y, yr, name="y")


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_top_k_all_blocks_equals_dense_gated_ffn(act):
    """At top_k == n_blocks the layer is the dense gated FFN, gradients included."""
    T, d, d_ff, g = 21, 24, 96, 16
    x, keys, values, kb, ob = make_problem(T, d, d_ff, dtype=torch.float64, requires_grad=True)
    gk, gb = gate_tables(d_ff, d, dtype=torch.float64, requires_grad=True)
    y = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=d_ff // g, key_bias=kb,
                        out_bias=ob, activation=act, backend="torch", gate_keys=gk, gate_bias=gb)
    ins = upcast(x, keys, values, kb, ob, gk, gb)
    xr, kr, vr, kbr, obr, gkr, gbr = ins
    yr = dense_gated_ffn_ref(xr, gkr, kr, vr, gate_bias=gbr, key_bias=kbr, out_bias=obr,
                             activation=act)
    assert_close(y, yr, name="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for name, got, want in zip(["dx", "dkeys", "dvalues", "dkb", "dob", "dgk", "dgb"],
                               grads(x, keys, values, kb, ob, gk, gb), grads(*ins), strict=True):
        assert_close(got, want, name=name)


def test_avgk_scores_the_gate_table_means():
    """Selection uses block_means(gate_keys, gate_bias): built so that the up table's means
    would choose other blocks."""
    T, d, d_ff, g, k = 16, 8, 64, 8, 2
    x, keys, values, kb, ob = make_problem(T, d, d_ff)
    gk, gb = gate_tables(d_ff, d)
    keys = -gk.detach() * 3  # the up table's means rank the blocks in the opposite order
    _, sel = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=k, key_bias=kb, out_bias=ob,
                             activation="silu", backend="torch", gate_keys=gk, gate_bias=gb,
                             return_selection=True)
    want = select_blocks_ref(x, *block_means_ref(gk, gb, g), k)
    up = select_blocks_ref(x, *block_means_ref(keys, kb, g), k)
    assert torch.equal(sel.indices, want)
    assert not torch.equal(want, up)


def test_empty_input_and_leading_dims():
    x, keys, values, kb, ob = make_problem(12, 16, 64)
    gk, gb = gate_tables(64, 16)
    kw = dict(block_size=16, top_k=2, key_bias=kb, out_bias=ob, activation="silu",
              backend="torch", gate_keys=gk, gate_bias=gb)
    y = sfnn.sparse_ffn(x.view(3, 4, 16), keys, values, **kw)
    assert_close(y.view(12, 16), sfnn.sparse_ffn(x, keys, values, **kw), atol=0, rtol=0,
                 name="y")
    empty = torch.zeros(0, 5, 16, requires_grad=True)
    out = sfnn.sparse_ffn(empty, keys, values, **kw)
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


# -- gradients: finite differences, subsets ----------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_all_seven_gradients_float64(act):
    """Finite differences in float64 on every gradient the backend returns (x, up keys, values,
    up bias, slot gates, gate keys, gate bias) and out_bias's."""
    T, d, d_ff, g = 6, 4, 12, 3
    x, keys, values, kb, ob = make_problem(T, d, d_ff, dtype=torch.float64, requires_grad=True)
    gk, gb = gate_tables(d_ff, d, dtype=torch.float64, requires_grad=True)
    idx = _indices(T, 2, d_ff // g, seed=3)
    gates = torch.rand(T, 2, dtype=torch.float64, requires_grad=True)

    def f(x, keys, values, kb, ob, gates, gk, gb):
        return sfnn.block_ffn(x, keys, values, idx, block_size=g, key_bias=kb, out_bias=ob,
                              gates=gates, activation=act, backend="torch", gate_keys=gk,
                              gate_bias=gb)

    assert torch.autograd.gradcheck(f, (x, keys, values, kb, ob, gates, gk, gb), eps=1e-6,
                                    atol=1e-5, rtol=1e-4)


def test_gradcheck_whole_layer_float64_no_bias():
    """The whole gated layer (selection by gate means), LLaMA-style: silu, no bias."""
    x, keys, values, _, _ = make_problem(5, 4, 12, bias=False, dtype=torch.float64,
                                         requires_grad=True)
    gk, _ = gate_tables(12, 4, bias=False, dtype=torch.float64, requires_grad=True)

    def f(x, keys, values, gk):
        return sfnn.sparse_ffn(x, keys, values, block_size=3, top_k=2, activation="silu",
                               backend="torch", gate_keys=gk)

    assert torch.autograd.gradcheck(f, (x, keys, values, gk), eps=1e-6, atol=1e-5, rtol=1e-4)


NEEDS = [
    (True,) * 7,
    (True, False, False, False, False, False, False),
    (False, True, False, False, False, False, False),
    (False, False, True, False, False, False, False),
    (False, False, False, True, False, False, False),
    (False, False, False, False, True, False, False),
    (False, False, False, False, False, True, False),
    (False, False, False, False, False, False, True),
    (False, True, True, False, False, True, True),
    (True, False, True, True, True, False, False),
]


@pytest.mark.parametrize("needs", NEEDS, ids=["".join("1" if n else "0" for n in nd)
                                               for nd in NEEDS])
@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recompute"])
def test_backward_needs_subsets(needs, saved, cpu_path):
    """Each subset of the seven gradients equals the same gradients of the full backward; the
    others are empty (not computed)."""
    T, d, d_ff, g = 19, 12, 48, 8
    x, keys, values, kb, ob = make_problem(T, d, d_ff)
    gk, gb = gate_tables(d_ff, d)
    idx = _indices(T, 3, d_ff // g)
    gates = torch.rand(T, 3)
    y, sv, route = ops.block_ffn_op(x, keys, values, idx, kb, ob, gates, g, "gelu", "torch",
                                    False, saved, gk, gb)
    assert sv.shape == ((T * 3, 2 * g) if saved else (0,))
    dy = torch.randn_like(y)
    args = (dy, x, keys, values, idx, kb, gates, sv, route, g, "gelu", "torch", False)
    full = ops.block_ffn_backward_op(*args, [True] * 7, gk, gb)
    part = ops.block_ffn_backward_op(*args, list(needs), gk, gb)
    for name, need, f, p in zip(ops.GRAD_NAMES, needs, full, part, strict=True):
        if need:
            assert_close(p, f, atol=1e-6, rtol=1e-6, name=name)
        else:
            assert p.numel() == 0, name


@pytest.mark.parametrize("frozen", ["x", "keys", "values", "key_bias", "gate_keys", "gate_bias"])
def test_frozen_tables_are_not_differentiated(monkeypatch, frozen):
    """The backend is asked only for the gradients autograd needs (fine-tuning one table)."""
    seen = []
    real = torch_path.block_ffn_bwd

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["needs"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_path, "block_ffn_bwd", spy)
    x, keys, values, kb, ob = make_problem(15, 8, 32)
    gk, gb = gate_tables(32, 8)
    named = dict(x=x, keys=keys, values=values, key_bias=kb, gate_keys=gk, gate_bias=gb)
    for name, t in named.items():
        t.requires_grad_(name != frozen)
    y = sfnn.sparse_ffn(x, keys, values, block_size=8, top_k=2, key_bias=kb, out_bias=ob,
                        activation="silu", backend="torch", gate_keys=gk, gate_bias=gb)
    y.square().sum().backward()
    want = tuple(n != frozen for n in ("x", "keys", "values", "key_bias")) + (False,) + \
        tuple(n != frozen for n in ("gate_keys", "gate_bias"))
    assert seen == [want]
    assert named[frozen].grad is None


def test_double_backward_and_torch_func():
    """create_graph=True, torch.func.grad, jvp and vmap∘grad go through differentiable ops."""
    T, d, d_ff, g = 5, 4, 12, 3
    x, keys, values, kb, ob = make_problem(T, d, d_ff, dtype=torch.float64, requires_grad=True)
    gk, gb = gate_tables(d_ff, d, dtype=torch.float64, requires_grad=True)
    kw = dict(block_size=g, top_k=2, key_bias=kb, out_bias=ob, activation="gelu",
              backend="torch", gate_bias=gb)

    def f(x, gk):
        return sfnn.sparse_ffn(x, keys, values, gate_keys=gk, **kw)

    assert torch.autograd.gradgradcheck(f, (x, gk), eps=1e-6, atol=1e-5, rtol=1e-4)

    def ref(x):
        return sparse_ffn_ref(x, keys, values, gate_keys=gk, **{k: v for k, v in kw.items()
                                                                 if k != "backend"})

    loss = (lambda fn: (lambda xx: fn(xx).square().sum()))
    assert_close(torch.func.grad(loss(lambda xx: f(xx, gk)))(x), torch.func.grad(loss(ref))(x),
                 name="func.grad")
    t = torch.randn_like(x)
    _, jv = torch.func.jvp(lambda xx: f(xx, gk), (x,), (t,))
    _, jv_ref = torch.func.jvp(ref, (x,), (t,))
    assert_close(jv, jv_ref, name="jvp")
    xs = torch.randn(3, T, d, dtype=torch.float64)
    per = torch.func.vmap(torch.func.grad(loss(lambda xx: f(xx, gk))))(xs)
    for i in range(3):
        assert_close(per[i], torch.func.grad(loss(ref))(xs[i]), name=f"vmap(grad)[{i}]")


# -- registered ops: opcheck ---------------------------------------------------------------------

def test_opcheck_gated_ops():
    x, keys, values, kb, ob = make_problem(12, 16, 64)
    gk, gb = gate_tables(64, 16)
    idx = _indices(12, 3, 4)
    gates = torch.rand(12, 3)
    for gate, gbias in ((None, gb), (gates, None)):
        torch.library.opcheck(ops.block_ffn_op, (x, keys, values, idx, kb, ob, gate, 16, "silu",
                                                 "torch", False, True, gk, gbias))
    args = (x.clone().requires_grad_(), keys.clone().requires_grad_(), values, idx, kb, ob,
            gates.clone().requires_grad_(), 16, "gelu", "torch", False, True,
            gk.clone().requires_grad_(), gb.clone().requires_grad_())
    torch.library.opcheck(ops.block_ffn_op, args)
    y, saved, route = ops.block_ffn_op(x, keys, values, idx, kb, ob, gates, 16, "silu", "torch",
                                       False, True, gk, gb)
    for needs in ([True] * 7, [True, False, True, False, True, False, True],
                  [False, True, False, True, False, True, False]):
        torch.library.opcheck(ops.block_ffn_backward_op,
                              (torch.randn_like(y), x, keys, values, idx, kb, gates, saved,
                               route, 16, "silu", "torch", False, needs, gk, gb))


# torch.compile(fullgraph=True) of a gated layer: test_compile.py, parametrized with the plain one.


# -- the module ----------------------------------------------------------------------------

class LlamaMLP(nn.Module):
    """LLaMA's MLP written out by hand: down(silu(gate(x)) * up(x)), no bias."""

    def __init__(self, d, d_ff, bias=False, act=nn.functional.silu):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=bias)
        self.up_proj = nn.Linear(d, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("kind", ["llama-silu-nobias", "geglu-bias"])
def test_from_dense_gated_matches_the_dense_mlp(kind):
    torch.manual_seed(0)
    if kind == "llama-silu-nobias":
        mlp, act = LlamaMLP(16, 64), "silu"
    else:
        mlp = LlamaMLP(16, 64, bias=True, act=lambda a: nn.functional.gelu(a))
        act = "gelu"
    mlp = mlp.double()
    ffn = sfnn.SparseFFN.from_dense_gated(mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                                          block_size=8, top_k=8, activation=act,
                                          backend="torch")
    assert ffn.gated and ffn.gate_weight.dtype == torch.float64
    if kind == "llama-silu-nobias":
        assert ffn.key_bias is None and ffn.gate_bias is None and ffn.out_bias is None
    else:
        assert_close(ffn.gate_bias, mlp.gate_proj.bias, atol=0, rtol=0, name="gate_bias")
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = ffn(x), mlp(xr)
    assert_close(y, yr, name="y")
    y.square().sum().backward()
    yr.square().sum().backward()
    assert_close(x.grad, xr.grad, name="dx")
    assert_close(ffn.gate_weight.grad, mlp.gate_proj.weight.grad, name="dgate")
    assert_close(ffn.key_weight.grad, mlp.up_proj.weight.grad, name="dup")
    assert_close(ffn.value_weight.grad, mlp.down_proj.weight.grad.t(), name="ddown")
    # a sparse copy (top_k < n_blocks) is the reference's sparse gated layer
    sparse = sfnn.SparseFFN.from_dense_gated(mlp.gate_proj, mlp.up_proj, mlp.down_proj,
                                             block_size=8, top_k=3, activation=act)
    want = sparse_ffn_ref(x, sparse.key_weight, sparse.value_weight, block_size=8, top_k=3,
                          key_bias=sparse.key_bias, out_bias=sparse.out_bias, activation=act,
                          gate_keys=sparse.gate_weight, gate_bias=sparse.gate_bias)
    assert_close(sparse(x), want, name="sparse")


def test_from_dense_gated_rejects_mismatched_layers():
    lin = nn.Linear(8, 32)
    with pytest.raises(TypeError, match="up_proj must be nn.Linear"):
        sfnn.SparseFFN.from_dense_gated(lin, nn.Conv1d(8, 32, 1), nn.Linear(32, 8),
                                        block_size=8, top_k=2)
    with pytest.raises(ValueError, match="up_proj must map"):
        sfnn.SparseFFN.from_dense_gated(lin, nn.Linear(8, 16), nn.Linear(32, 8), block_size=8,
                                        top_k=2)
    with pytest.raises(ValueError, match="down_proj must map"):
        sfnn.SparseFFN.from_dense_gated(lin, nn.Linear(8, 32), nn.Linear(16, 8), block_size=8,
                                        top_k=2)


def test_module_parameters_init_and_state_dict_round_trip():
    torch.manual_seed(1)
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=3, activation="silu", gated=True)
    names = dict(ffn.named_parameters())
    assert set(names) == {"key_weight", "value_weight", "key_bias", "out_bias", "gate_weight",
                          "gate_bias"}
    assert ffn.gate_weight.shape == (64, 16) and ffn.gate_bias.shape == (64,)
    assert float(ffn.gate_weight.detach().abs().max()) <= 16 ** -0.5
    assert not torch.equal(ffn.gate_weight, ffn.key_weight)
    assert "gated=True" in repr(ffn)
    nobias = sfnn.SparseFFN(16, 64, block_size=8, top_k=3, gated=True, bias=False)
    assert nobias.gate_bias is None and nobias.key_bias is None
    buf = io.BytesIO()
    torch.save(ffn.state_dict(), buf)
    buf.seek(0)
    other = sfnn.SparseFFN(16, 64, block_size=8, top_k=3, activation="silu", gated=True)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(10, 16)
    assert torch.equal(other(x), ffn(x))
    plain = sfnn.SparseFFN(16, 64, block_size=8, top_k=3)
    with pytest.raises(RuntimeError, match="gate_weight"):
        plain.load_state_dict(ffn.state_dict())
    with pytest.raises(RuntimeError, match="gate_weight"):
        other.load_state_dict(plain.state_dict())


def test_eval_mode_means_cache_follows_the_gate_table():
    """In eval mode the cached means are the gate table's, and an in-place update refreshes."""
    torch.manual_seed(2)
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, activation="silu", gated=True,
                         backend="torch").eval()
    x = torch.randn(9, 16)

    def ref():
        return sparse_ffn_ref(x, ffn.key_weight, ffn.value_weight, block_size=8, top_k=2,
                              key_bias=ffn.key_bias, out_bias=ffn.out_bias, activation="silu",
                              gate_keys=ffn.gate_weight, gate_bias=ffn.gate_bias)

    with torch.no_grad():
        assert_close(ffn(x), ref(), name="first")
        assert ffn.means_cache.filled
        ffn.gate_weight.mul_(-1.0)
        assert_close(ffn(x), ref(), name="after in-place update")


@pytest.mark.parametrize("method", ["switch", "moe", "hash", "random"])
def test_selection_methods_compose_with_gated_layers(method):
    """Issue 10's methods: their slot gates scale a gated block's output; all gradients
    (router's included) match the reference."""
    torch.manual_seed(3)
    vocab = 30
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, activation="silu", gated=True,
                         selection=method, vocab_size=vocab if method == "hash" else None,
                         seed=11, backend="torch")
    x = torch.randn(13, 16, dtype=torch.float32, requires_grad=True)
    ids = torch.randint(0, vocab, (13,))
    y = ffn(x, token_ids=ids)
    loss = y.square().sum() + ffn.aux_loss()
    loss.backward()
    params = dict(ffn.named_parameters())
    ref_params = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    xr = x.detach().double().requires_grad_()
    margs = {}
    if method in ("switch", "moe"):
        margs["router_weight"] = ref_params["router_weight"]
    if method == "hash":
        margs.update(token_ids=ids, hash_table=balanced_hash_table(vocab, 8, 2, seed=11))
        assert torch.equal(margs["hash_table"], ffn.hash_table)
    if method == "random":
        margs["seed"] = sfnn.selection.call_seed(ffn.random_seed, ffn.random_calls - 1)
    yr, _, gates, bal, _ = sparse_ffn_ref(
        xr, ref_params["key_weight"], ref_params["value_weight"], block_size=8, top_k=2,
        key_bias=ref_params["key_bias"], out_bias=ref_params["out_bias"], activation="silu",
        selection=method, gate_keys=ref_params["gate_weight"],
        gate_bias=ref_params["gate_bias"], return_selection=True, **margs)
    assert (gates is not None) == (method in ("switch", "moe"))
    assert_close(y, yr, name="y")
    (yr.square().sum() + ffn.balance_loss_weight * bal).backward()
    assert_close(x.grad, xr.grad, name="dx")
    for name, p in params.items():
        assert_close(p.grad, ref_params[name].grad, name=f"d{name}")


# -- backends, routing, errors -----------------------------------------------------------------

def test_gated_capability_check_routes_auto(monkeypatch):
    """auto sends gated calls on CUDA tensors to a backend with a gated path (torch today);
    adding a backend to GATED_BACKENDS is what lets auto choose it."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(ops, "backend_unavailable_reason", lambda *a, **k: None)
    assert ops.resolve_backend("auto", cuda, 1000, True, torch.float32) == "triton"
    assert ops.resolve_backend("auto", cuda, 1000, True, torch.float32, gated=True) == "triton"
    monkeypatch.setattr(ops, "GATED_BACKENDS", frozenset({"torch", "cuda"}))
    assert ops.resolve_backend("auto", cuda, 1000, True, torch.float32, gated=True) == "torch"
    assert ops.resolve_backend("auto", cuda, 1, False, torch.float32) == "cuda"
    assert ops.resolve_backend("auto", cuda, 1, False, torch.float32, gated=True) == "cuda"
    monkeypatch.setattr(ops, "GATED_BACKENDS", frozenset({"torch"}))
    assert ops.resolve_backend("auto", cuda, 1, False, torch.float32, gated=True) == "torch"
    monkeypatch.setattr(ops, "GATED_BACKENDS", frozenset({"torch", "triton"}))
    assert ops.resolve_backend("auto", cuda, 1, False, torch.float32, gated=True) == "triton"
    assert ops.has_gated("triton") and not ops.has_gated("cuda")


def test_cuda_backend_passes_the_gate_table_to_the_decode_kernel(monkeypatch):
    """The CUDA extension's gated gather-GEMV gets gate_keys/gate_bias (a stand-in extension
    records the call: there is no GPU here; tests/test_cuda_ext.py runs the kernel)."""
    seen = {}

    class FakeExt:
        decode_select = None

        @staticmethod
        def decode_ffn(x2d, keys, values, indices, key_bias, out_bias, gates, **kw):
            seen.update(kw)
            return block_ffn_ref(x2d, keys, values, indices, block_size=kw["block_size"],
                                 key_bias=key_bias, out_bias=out_bias, gates=gates,
                                 activation=kw["activation"], gate_keys=kw["gate_keys"],
                                 gate_bias=kw["gate_bias"])

    monkeypatch.setattr(ops, "_cuda_ext", lambda: FakeExt)
    x, keys, values, kb, ob = make_problem(3, 16, 64)
    gk, gb = gate_tables(64, 16)
    idx = _indices(3, 2, 4)
    y, _, _ = ops.block_ffn_op(x, keys, values, idx, kb, ob, None, 16, "silu", "cuda", False,
                               False, gk, gb)
    assert seen["gate_keys"] is not None and seen["gate_bias"] is not None
    assert_close(y, block_ffn_ref(x, keys, values, idx, block_size=16, key_bias=kb,
                                  out_bias=ob, activation="silu", gate_keys=gk, gate_bias=gb),
                 name="y")


@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton", "cuda_ext"])
def test_backends_without_a_gated_path_refuse_it(backend, monkeypatch):
    """A backend left out of GATED_BACKENDS (as Triton and the CUDA extension were before their
    gated kernels) refuses gated calls by name."""
    monkeypatch.setattr(ops, "GATED_BACKENDS", frozenset({"torch"}))
    x, keys, values, kb, ob = make_problem(4, 16, 64)
    gk, gb = gate_tables(64, 16)
    with pytest.raises(NotImplementedError, match="gated"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, backend=backend, gate_keys=gk)
    with pytest.raises(NotImplementedError, match="gated"):
        sfnn.block_ffn(x, keys, values, _indices(4, 2, 4), block_size=16, backend=backend,
                       gate_keys=gk, gate_bias=gb)
    with pytest.raises(NotImplementedError, match="gated"):
        ops.block_ffn_op(x, keys, values, _indices(4, 2, 4), kb, ob, None, 16, "silu", backend,
                         False, False, gk, gb)
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, gated=True, backend=backend)
    with pytest.raises(NotImplementedError, match="gated"):
        ffn(x)


def test_plain_calls_keep_the_plain_protocol_for_non_gated_backends(monkeypatch):
    """A backend without a gated path gets five needs flags and returns five gradients; the
    op layer pads the gate tables' two."""
    calls = []

    def bwd(*args, needs, **kwargs):
        calls.append((tuple(needs), sorted(kwargs)))
        return torch_path.block_ffn_bwd(*args, needs=needs, **kwargs)

    fake = type("Plain", (), dict(block_ffn_bwd=staticmethod(bwd)))
    monkeypatch.setattr(ops, "_impl", lambda backend: fake)
    monkeypatch.setattr(ops, "GATED_BACKENDS", frozenset({"torch"}))
    x, keys, values, kb, ob = make_problem(8, 16, 64)
    idx = _indices(8, 2, 4)
    y, saved, _ = torch_path.block_ffn_fwd(x, keys, values, idx, kb, ob, None, block_size=16,
                                           activation="relu", save_for_backward=True,
                                           deterministic=False)
    out = ops.block_ffn_backward_op(torch.randn_like(y), x, keys, values, idx, kb, None, saved,
                                    idx.new_empty(0), 16, "relu", "triton", False, [True] * 7)
    assert len(out) == 7 and out[5].numel() == 0 and out[6].numel() == 0
    assert calls[0][0] == (True, True, True, True, False)
    assert "gate_keys" not in calls[0][1]


def test_bad_gated_input_is_refused():
    x, keys, values, kb, ob = make_problem(4, 16, 64)
    gk, gb = gate_tables(64, 16)
    kw = dict(block_size=16, top_k=2, key_bias=kb, out_bias=ob, backend="torch")
    with pytest.raises(ValueError, match="gate_bias .* needs gate_keys"):
        sfnn.sparse_ffn(x, keys, values, gate_bias=gb, **kw)
    with pytest.raises(ValueError, match="gate_bias .* needs gate_keys"):
        sfnn.block_ffn(x, keys, values, _indices(4, 2, 4), block_size=16, gate_bias=gb)
    with pytest.raises(ValueError, match="needs gate_keys"):
        ops.block_ffn_op(x, keys, values, _indices(4, 2, 4), kb, ob, None, 16, "silu", "torch",
                         False, False, None, gb)
    with pytest.raises(ValueError, match=r"gate_keys must be \(d_ff, d_model\)"):
        sfnn.sparse_ffn(x, keys, values, gate_keys=gk[:32], **kw)
    with pytest.raises(ValueError, match=r"gate_keys must be 2-D"):
        sfnn.sparse_ffn(x, keys, values, gate_keys=gk[0], **kw)
    with pytest.raises(ValueError, match=r"gate_bias must be \(d_ff,\)"):
        sfnn.sparse_ffn(x, keys, values, gate_keys=gk, gate_bias=gb[:8], **kw)
    with pytest.raises(TypeError, match="gate_keys must be a floating tensor"):
        sfnn.sparse_ffn(x, keys, values, gate_keys=gk.long(), **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        sfnn.sparse_ffn(x, keys, values, gate_keys=gk.double(), **kw)
    with pytest.raises(TypeError, match="gated must be a bool"):
        sfnn.SparseFFN(16, 64, block_size=16, top_k=2, gated="yes")
    with pytest.raises(TypeError, match="drop gated="):
        sfnn.SparseFFN.from_dense_gated(nn.Linear(16, 64), nn.Linear(16, 64),
                                        nn.Linear(64, 16), block_size=16, top_k=2, gated=False)


def test_block_parallel_refuses_gated_layers():
    from sfnn.distributed import BlockParallelSparseFFN

    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, gated=True)
    with pytest.raises(NotImplementedError, match="gated"):
        BlockParallelSparseFFN.from_sparse_ffn(ffn)


# -- the sweep's gated cases -------------------------------------------------------------------

def test_sweep_gated_cases_run_and_check(tmp_path):
    """A gated case: 'dense' is the dense gated FFN, 'torch' the gated layer (checked against
    the gated reference), the summary names the gated targets."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sfnn_bench_sweep_gated",
                                                  root / "bench" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep
    spec.loader.exec_module(sweep)
    from sweeplib.cases import Case  # bench/ is on sys.path once sweep.py is loaded
    from sweeplib.providers import GatedMLP, Problem
    from sweeplib.report import acceptance_summary
    from sweeplib.runner import run_sweep

    for device in ("cpu", "cuda"):
        cases = sweep.PRESETS["gated"](device)
        assert cases and all(c.gated for c in cases)
        for c in cases:
            c.validate()
    acc = [c for c in sweep.PRESETS["default"]("cpu") if c.tag == "gated-acceptance"]
    assert {c.mode for c in acc} == {"forward", "forward+backward"} and all(c.gated for c in acc)
    case = Case(64, 32, 128, 16, 2, "forward+backward", activation="silu", gated=True,
                providers=("dense", "naive", "torch"), tag="gated-acceptance", min_reps=2)
    pb = Problem(case, "cpu")
    assert isinstance(pb.dense, GatedMLP)
    with torch.no_grad():
        want = dense_gated_ffn_ref(pb.x, pb.gate_keys, pb.keys, pb.values, gate_bias=pb.gate_bias,
                                   key_bias=pb.key_bias, out_bias=pb.out_bias)
        assert_close(pb.dense(pb.x), want, name="dense gated baseline")
    threads = torch.get_num_threads()
    try:
        rc = run_sweep([case], device="cpu", out_dir=str(tmp_path), preset="gated", budget=2.0,
                       max_minutes=None, ceilings_how="measured", threads=1)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    import csv

    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"dense", "naive", "torch"}
    assert by["torch"]["check"] == "ok" and by["naive"]["check"] == "ok"
    assert all(r["gated"] == "True" for r in rows)
    assert float(by["torch"]["speedup_vs_dense"]) > 0
    lines = acceptance_summary(rows)
    assert lines[0].startswith("GATED ACCEPTANCE") and "target >= 2.5x" in lines[1]
    assert "(gated)" in (tmp_path / "sweep.md").read_text()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_blocks_cut_into_several_chunks(monkeypatch, chunk):
    """The torch path batches each block's pairs in chunks of GATED_CHUNK rows: a block spread
    over several chunks (padding included) gives the same y and gradients."""
    monkeypatch.setattr(torch_path, "GATED_CHUNK", chunk)
    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: None)
    check_gated_block_ffn(23, 12, 48, 8, 3, act="gelu", bias=True, slot_gates=True,
                          dtype=torch.float32, distinct=False)
    check_gated_block_ffn(17, 8, 32, 8, 2, act="silu", bias=False, slot_gates=False,
                          dtype=torch.float64)
