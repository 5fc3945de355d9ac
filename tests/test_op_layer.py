"""The op layer's Python items of issue 18: dtype routing, index range, contiguity, forward-mode
AD and torch.func, double backward, autocast and float64 scores, gradients asked for."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from _cases import backend_device, make_problem, upcast

import sfnn
from sfnn import cpu_kernel, ops, torch_path
from sfnn.reference import block_ffn_ref, select_blocks_ref, sparse_ffn_ref
from sfnn.testing import assert_close

needs_triton = pytest.mark.skipif(ops.triton_import_error() is not None,
                                  reason=f"Triton unavailable: {ops.triton_import_error()}")
CUDA = torch.device("cuda")


def _indices(T, top_k, n_blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_blocks, generator=g)[:top_k] for _ in range(T)]).int()


# 18.2: float64 never goes to Triton (or the CUDA extension) under auto ---------------------

def test_auto_routes_float64_cuda_tensors_to_torch(monkeypatch):
    """The rule on the CPU: with every backend available, float64 CUDA tensors still go to the
    torch path, and float32/bfloat16 ones do not."""
    monkeypatch.setattr(ops, "backend_unavailable_reason", lambda *args, **kwargs: None)
    assert ops.resolve_backend("auto", CUDA, 1, False, torch.float64) == "torch"
    assert ops.resolve_backend("auto", CUDA, 4096, True, torch.float64) == "torch"
    assert ops.resolve_backend("auto", CUDA, 1, False, torch.float32) == "cuda"
    assert ops.resolve_backend("auto", CUDA, 4096, True, torch.bfloat16) == "triton"


# ids without the bare word "cuda": conftest skips tests carrying that keyword on CPU machines
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton-backend", "cuda-backend"])
def test_explicit_kernel_backend_with_float64_is_a_clear_error(backend):
    x, keys, values, kb, ob = make_problem(6, 16, 64, dtype=torch.float64)
    idx = _indices(6, 2, 4)
    calls = [lambda: sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, backend=backend),
             lambda: sfnn.block_ffn(x, keys, values, idx, block_size=16, backend=backend),
             lambda: sfnn.block_means(keys, kb, block_size=16, backend=backend),
             lambda: sfnn.select_blocks(x, keys[:4], None, 2, backend=backend)]
    for call in calls:
        with pytest.raises(RuntimeError, match=f"backend='{backend}' does not compute in float64"):
            call()
    assert ops.backend_unavailable_reason(backend, CUDA, torch.float64) is not None


# 18.8: int64 indices are range-checked before the int32 cast ------------------------------

@pytest.mark.parametrize("bad", [2 ** 32 + 1, 2 ** 31, -(2 ** 32) + 2])
def test_int64_indices_past_int32_are_rejected(bad):
    x, keys, values, _, _ = make_problem(5, 16, 64)
    idx = _indices(5, 2, 4).long()
    idx[3, 1] = bad  # wraps to a valid block (1 or 2) in int32 for two of the three values
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_blocks=4\)"):
        sfnn.block_ffn(x, keys, values, idx, block_size=16)


# 18.11: non-contiguous key_bias / bbar reach every backend contiguous ----------------------

@needs_triton
def test_non_contiguous_bias_and_bbar_on_triton():
    dev = backend_device("triton")
    x, keys, values, kb, ob = make_problem(9, 16, 64, device=dev)
    kb_strided = torch.stack([kb, kb], 1)[:, 0]  # (64,) with stride 2
    bbar_strided = torch.randn(4, 2, device=dev)[:, 1]
    assert not kb_strided.is_contiguous() and not bbar_strided.is_contiguous()
    kbar, bbar = ops.block_means_op(keys, kb_strided, 16, "triton")
    want_kbar, want_bbar = torch_path.block_means(keys, kb, 16)
    assert_close(kbar, want_kbar, name="kbar")
    assert_close(bbar, want_bbar, name="bbar")
    idx = ops.select_blocks_op(x, kbar, bbar_strided, 2, "triton")
    assert torch.equal(idx.cpu(), select_blocks_ref(x.cpu(), kbar.cpu(), bbar_strided.cpu(), 2))
    y = sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, key_bias=kb_strided,
                        out_bias=ob, backend="triton")
    assert_close(y, sparse_ffn_ref(x, keys, values, block_size=16, top_k=2, key_bias=kb,
                                   out_bias=ob))


def test_backends_receive_contiguous_optional_tensors(monkeypatch):
    """The protocol promises contiguous tensors: checked on what the torch path receives."""
    seen = []
    for name in ("block_means", "select_blocks", "block_ffn_fwd", "block_ffn_bwd"):
        real = getattr(torch_path, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.numel() > 1]
            seen.append((_name, all(t.is_contiguous() for t in tensors)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch_path, name, spy)
    x, keys, values, kb, ob = make_problem(9, 16, 64, requires_grad=True)
    gates = torch.rand(9, 4)[:, ::2].requires_grad_()
    strided = [t.detach().repeat_interleave(2)[::2].requires_grad_() for t in (kb, ob)]
    assert not strided[0].is_contiguous()
    ops.block_means_op(keys.detach(), strided[0].detach(), 16, "torch")
    ops.select_blocks_op(x.detach(), torch.randn(4, 16), torch.randn(4, 2)[:, 0], 2, "torch")
    y = sfnn.block_ffn(x, keys, values, _indices(9, 2, 4), block_size=16, key_bias=strided[0],
                       out_bias=strided[1], gates=gates, backend="torch")
    y.sum().backward()
    assert [n for n, _ in seen] == ["block_means", "select_blocks", "block_ffn_fwd",
                                    "block_ffn_bwd"]
    assert all(ok for _, ok in seen), seen


# 18.12: forward-mode AD and torch.func --------------------------------------------------

def _problem64(bias=True):
    return make_problem(11, 12, 48, bias=bias, dtype=torch.float64)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_jvp_through_sparse_ffn_matches_reference(act):
    x, keys, values, kb, ob = _problem64()
    primals = (x, keys, values, kb, ob)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def ours(*args):
        return sfnn.sparse_ffn(args[0], args[1], args[2], block_size=12, top_k=2,
                               key_bias=args[3], out_bias=args[4], activation=act)

    def ref(*args):
        return sparse_ffn_ref(args[0], args[1], args[2], block_size=12, top_k=2,
                              key_bias=args[3], out_bias=args[4], activation=act)

    y, t = torch.func.jvp(ours, primals, tangents)
    y_ref, t_ref = torch.func.jvp(ref, primals, tangents)
    assert_close(y, y_ref, name="y")
    assert float(t_ref.abs().max()) > 0.1
    assert_close(t, t_ref, name="tangent")
    only_out_bias = tuple(torch.zeros_like(p) for p in primals[:4]) + (torch.ones_like(ob),)
    _, t_ob = torch.func.jvp(ours, primals, only_out_bias)
    assert torch.equal(t_ob, torch.ones_like(t_ob))


def test_jvp_and_dual_tensors_through_block_ffn_with_gates():
    x, keys, values, kb, ob = _problem64()
    idx = _indices(11, 3, 4)
    gates = torch.rand(11, 3, dtype=torch.float64)
    primals = (x, keys, values, kb, ob, gates)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def ours(*a):
        return sfnn.block_ffn(a[0], a[1], a[2], idx, block_size=12, key_bias=a[3],
                              out_bias=a[4], gates=a[5], activation="gelu")

    def ref(*a):
        return block_ffn_ref(a[0], a[1], a[2], idx, block_size=12, key_bias=a[3],
                             out_bias=a[4], gates=a[5], activation="gelu")

    _, t_ref = torch.func.jvp(ref, primals, tangents)
    _, t = torch.func.jvp(ours, primals, tangents)
    assert_close(t, t_ref, name="torch.func.jvp tangent")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        t_dual = fwAD.unpack_dual(ours(*duals)).tangent
    assert t_dual is not None
    assert_close(t_dual, t_ref, name="forward_ad tangent")


def test_func_grad_wrt_x_and_jacobians():
    x, keys, values, kb, ob = _problem64()

    def f(xx):
        return sfnn.sparse_ffn(xx, keys, values, block_size=12, top_k=2, key_bias=kb,
                               out_bias=ob, activation="silu")

    def f_ref(xx):
        return sparse_ffn_ref(xx, keys, values, block_size=12, top_k=2, key_bias=kb,
                              out_bias=ob, activation="silu")

    gx = torch.func.grad(lambda xx: f(xx).square().sum())(x)
    xr = x.clone().requires_grad_()
    f_ref(xr).square().sum().backward()
    assert_close(gx, xr.grad, name="torch.func.grad wrt x")
    x1 = x[:2]
    want = torch.func.jacrev(f_ref)(x1)
    assert_close(torch.func.jacrev(f)(x1), want, name="jacrev")
    assert_close(torch.func.jacfwd(f)(x1), want, name="jacfwd")
    hess_ref = torch.func.hessian(lambda xx: f_ref(xx).square().sum())(x1)
    assert_close(torch.func.hessian(lambda xx: f(xx).square().sum())(x1), hess_ref,
                 name="hessian")


def test_vmap_of_grad_gives_per_sample_gradients():
    x, keys, values, kb, ob = _problem64()
    params = (keys, values, kb, ob)

    def loss(p, xi):
        return sfnn.sparse_ffn(xi[None], p[0], p[1], block_size=12, top_k=2, key_bias=p[2],
                               out_bias=p[3], activation="gelu").square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        ps = upcast(*params)
        sparse_ffn_ref(x[i:i + 1], *ps[:2], block_size=12, top_k=2, key_bias=ps[2],
                       out_bias=ps[3], activation="gelu").square().sum().backward()
        for j, p in enumerate(ps):
            assert_close(per_sample[j][i], p.grad, name=f"sample {i}, parameter {j}")


# 18.13: double backward ---------------------------------------------------------------

@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_double_backward_gradgradcheck(act):
    x, keys, values, kb, ob = make_problem(6, 5, 12, dtype=torch.float64, requires_grad=True)

    def f(x, keys, values, kb, ob):
        return sfnn.sparse_ffn(x, keys, values, block_size=3, top_k=2, key_bias=kb,
                               out_bias=ob, activation=act, backend="torch")

    assert torch.autograd.gradgradcheck(f, (x, keys, values, kb, ob), eps=1e-6, atol=1e-5,
                                        rtol=1e-4)


def test_double_backward_with_gates_and_frozen_tables():
    x, keys, values, kb, ob = make_problem(7, 5, 12, dtype=torch.float64, requires_grad=True)
    values.requires_grad_(False)
    idx = _indices(7, 2, 4)
    gates = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)

    def f(x, keys, kb, gates):
        return sfnn.block_ffn(x, keys, values, idx, block_size=3, key_bias=kb, out_bias=ob,
                              gates=gates, activation="silu", backend="torch")

    assert torch.autograd.gradgradcheck(f, (x, keys, kb, gates), eps=1e-6, atol=1e-5,
                                        rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if ops.triton_import_error() is None
                                                 else []))
def test_gradient_penalty_matches_reference(backend):
    """create_graph=True then a second backward, as a gradient penalty does, on each backend."""
    dev = backend_device(backend)
    x, keys, values, kb, ob = make_problem(10, 16, 64, device=dev, requires_grad=True)
    y = sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, key_bias=kb, out_bias=ob,
                        activation="gelu", backend=backend)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    xr, kr, vr, kbr, obr = upcast(x, keys, values, kb, ob)
    yr = sparse_ffn_ref(xr, kr, vr, block_size=16, top_k=2, key_bias=kbr, out_bias=obr,
                        activation="gelu")
    (gxr,) = torch.autograd.grad(yr.square().sum(), xr, create_graph=True)
    gxr.square().sum().backward()
    assert_close(gx, gxr, name="dx")
    for name, got, want in (("keys", keys, kr), ("values", values, vr), ("key_bias", kb, kbr)):
        assert_close(got.grad, want.grad, name=f"d(penalty)/d{name}")


# 18.15: autocast leaves float64 alone; float64 scores keep float64 resolution -------------

def test_autocast_leaves_float64_alone_like_linear():
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, dtype=torch.float64)
    lin = torch.nn.Linear(16, 16, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
        assert y.dtype == lin(x).dtype == torch.float64
        with pytest.raises(TypeError, match="autocast leaves float64 tensors alone"):
            sfnn.SparseFFN(16, 64, block_size=16, top_k=2)(x)  # float64 x, float32 weights
        with pytest.raises(RuntimeError):
            torch.nn.Linear(16, 16)(x)  # ... which nn.Linear refuses too
    ref = sparse_ffn_ref(x, ffn.key_weight, ffn.value_weight, block_size=16, top_k=2,
                         key_bias=ffn.key_bias, out_bias=ffn.out_bias)
    assert_close(y, ref, name="float64 under autocast")


def test_float64_means_and_scores_keep_float64_resolution():
    keys = torch.zeros(64, 8, dtype=torch.float64)
    keys[16:32] = 1e-12  # block 1 beats block 0 by far less than float32 resolution
    keys[:, 0] += 1.0
    kbar, bbar = sfnn.block_means(keys, None, block_size=16)
    assert kbar.dtype == torch.float64
    x = torch.ones(3, 8, dtype=torch.float64)
    assert sfnn.select_blocks(x, kbar, None, 1).flatten().tolist() == [1, 1, 1]
    assert sfnn.select_blocks(x, kbar, None, 1, backend="reference").flatten().tolist() == [1] * 3
    values = torch.randn(64, 8, dtype=torch.float64)
    y = sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=1)
    want = sfnn.block_ffn(x, keys, values, torch.ones(3, 1, dtype=torch.int32), block_size=16)
    assert torch.equal(y, want)
    assert sfnn.select_blocks(x.float(), kbar, None, 1).flatten().tolist() == [0, 0, 0]  # a tie


# 18.16: only the gradients asked for ------------------------------------------------

def test_only_out_bias_gradient_runs_no_backward_kernel(monkeypatch):
    fwd_saves, bwd_calls = [], []
    real_fwd, real_bwd = torch_path.block_ffn_fwd, torch_path.block_ffn_bwd

    def fwd(*args, **kwargs):
        fwd_saves.append(kwargs["save_for_backward"])
        return real_fwd(*args, **kwargs)

    def bwd(*args, **kwargs):
        bwd_calls.append(kwargs["needs"])
        return real_bwd(*args, **kwargs)

    monkeypatch.setattr(torch_path, "block_ffn_fwd", fwd)
    monkeypatch.setattr(torch_path, "block_ffn_bwd", bwd)
    x, keys, values, kb, ob = make_problem(12, 16, 64)
    ob.requires_grad_()
    y = sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, key_bias=kb, out_bias=ob,
                        backend="torch")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert fwd_saves == [False] and bwd_calls == []
    assert_close(ob.grad, dy.sum(0), name="dout_bias")


# the eager fast path: a registered op's body without the dispatcher where nothing needs it -----

def _spy_ops(monkeypatch):
    """Record which door each forward op went through: "op" (the registered op), "body", or
    "fused" (the torch backend's one-call Avg-K step, ``avgk_ffn``)."""
    seen = []
    for name in ("block_means", "select_blocks", "block_ffn"):
        op, body = getattr(ops, f"{name}_op"), getattr(ops, f"_{name}")

        def spy(*a, _op=op, _name=name, **k):
            seen.append((_name, "op"))
            return _op(*a, **k)

        def spy_body(*a, _body=body, _name=name, **k):
            seen.append((_name, "body"))
            return _body(*a, **k)

        monkeypatch.setattr(ops, f"{name}_op", spy)
        monkeypatch.setattr(ops, f"_{name}", spy_body)

    def spy_fused(*a, _fused=torch_path.avgk_ffn_fwd, **k):
        seen.append(("avgk_ffn", "fused"))
        return _fused(*a, **k)

    monkeypatch.setattr(torch_path, "avgk_ffn_fwd", spy_fused)
    return seen


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_inference_calls_take_the_fused_step_with_the_same_bits(monkeypatch, gated):
    """No gradient recorded (no_grad, or nothing requires grad): the block means run as their
    op's body and selection + FFN as the backend's one fused step, for a layer's nn.Parameters
    too, with the registered ops' result bit for bit."""
    ffn = sfnn.SparseFFN(24, 96, block_size=8, top_k=3, activation="gelu", backend="torch",
                         gated=gated)
    x = torch.randn(5, 24)
    seen = _spy_ops(monkeypatch)
    want = ffn(x).detach()  # a gradient to record: the registered ops
    assert ("block_ffn", "op") in seen and ("avgk_ffn", "fused") not in seen, seen
    # Without the CPU kernel a short no-grad forward takes the few-token loop, which rounds
    # differently from the grouped one a recorded forward takes.
    def same(a, b):
        if cpu_kernel.available():
            return torch.equal(a, b)
        assert_close(a, b, name="y")
        return True

    seen.clear()
    with torch.no_grad():
        got = ffn(x)
    assert same(got, want)
    assert set(seen) == {("block_means", "body"), ("avgk_ffn", "fused")}, seen
    seen.clear()
    keys, values = ffn.key_weight.detach(), ffn.value_weight.detach()
    gated_kw = dict(gate_keys=ffn.gate_weight.detach(),
                    gate_bias=ffn.gate_bias.detach()) if gated else {}
    got, sel = sfnn.sparse_ffn(x, keys, values, block_size=8, top_k=3, activation="gelu",
                               key_bias=ffn.key_bias.detach(), out_bias=ffn.out_bias.detach(),
                               backend="torch", return_selection=True, **gated_kw)
    assert same(got, want)
    assert set(seen) == {("block_means", "body"), ("avgk_ffn", "fused")}, seen
    assert sel.indices.dtype == torch.int32 and sel.indices.shape == (5, 3) and sel.gates is None
    assert sel.aux_loss.dtype == torch.float32 and float(sel.aux_loss) == 0.0


def test_avgk_ffn_takes_the_two_ops_when_it_must():
    """Saving for a backward, or no tokens: the registered ops' composition, not the fused
    step; the results have the shapes the fused step's would."""
    x, keys, values, kb, ob = make_problem(4, 16, 64)
    kbar, bbar = torch_path.block_means(keys, kb, 8)
    args = (kbar, bbar, keys, values, kb, ob, 3, 8, "relu", "torch", False)
    y_fused, idx_fused = ops.avgk_ffn(x, *args, False)
    y_saved, idx_saved = ops.avgk_ffn(x, *args, True)
    assert torch.equal(idx_saved, idx_fused)
    assert_close(y_saved, y_fused, name="y")
    y0, idx0 = ops.avgk_ffn(x[:0], *args, False)
    assert y0.shape == (0, 16) and idx0.shape == (0, 3) and idx0.dtype == torch.int32


def test_cuda_backend_fuses_selection_and_ffn_in_decode_step(monkeypatch):
    """The CUDA backend's fused step is the extension's decode_step (one launch); a gated call,
    which decode_step does not serve, is decode_select then decode_ffn. Checked on the CPU with
    a stand-in extension made of the torch path's functions."""
    calls = []

    def decode_step(x2d, kbar, bbar, keys, values, key_bias, out_bias, *, top_k, block_size,
                    activation):
        calls.append("decode_step")
        return torch_path.avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias,
                                       top_k=top_k, block_size=block_size,
                                       activation=activation)

    def decode_select(x2d, kbar, bbar, top_k):
        calls.append("decode_select")
        return torch_path.select_blocks(x2d, kbar, bbar, top_k)

    def decode_ffn(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size,
                   activation, gate_keys=None, gate_bias=None):
        calls.append(("decode_ffn", gate_keys is not None))
        return torch_path.block_ffn_fwd(
            x2d, keys, values, indices, key_bias, out_bias, gates, block_size=block_size,
            activation=activation, save_for_backward=False, deterministic=False,
            gate_keys=gate_keys, gate_bias=gate_bias)[0]

    from types import SimpleNamespace

    fake = SimpleNamespace(decode_step=decode_step, decode_select=decode_select,
                           decode_ffn=decode_ffn)
    monkeypatch.setattr(ops, "_cuda_ext", lambda: fake)
    ops._cuda_backend.cache_clear()
    try:
        x, keys, values, kb, ob = make_problem(2, 16, 64)
        kbar, bbar = torch_path.block_means(keys, kb, 8)
        args = (x, kbar, bbar, keys, values, kb, ob, 3, 8, "gelu", "cuda", False, False)
        y, idx = ops.avgk_ffn(*args)
        assert calls == ["decode_step"]
        want = sparse_ffn_ref(x, keys, values, block_size=8, top_k=3, key_bias=kb, out_bias=ob,
                              activation="gelu")
        assert_close(y, want, name="y")
        calls.clear()
        gk = make_problem(1, 16, 64)[1]
        ops.avgk_ffn(*args, gk, None)
        assert calls == ["decode_select", ("decode_ffn", True)]
    finally:
        ops._cuda_backend.cache_clear()


def test_calls_that_need_the_dispatcher_go_through_the_registered_ops(monkeypatch):
    """A gradient to record, a dispatch mode that must see sfnn's ops, or a tensor subclass:
    the registered op runs (selection, which records nothing, still runs as its body while
    only autograd is involved)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ffn = sfnn.SparseFFN(24, 96, block_size=8, top_k=3, backend="torch")
    x = torch.randn(5, 24)
    seen = _spy_ops(monkeypatch)
    ffn(x).sum().backward()
    assert ("block_ffn", "op") in seen and ("block_ffn", "body") not in seen, seen

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    seen.clear()
    with torch.no_grad(), Names() as mode:
        ffn(x)
    assert {door for _, door in seen} == {"op"}, seen
    assert any(n.startswith("sfnn.block_ffn") for n in mode.names), mode.names

    class Tagged(torch.Tensor):
        pass

    seen.clear()
    with torch.no_grad():
        sfnn.sparse_ffn(x.as_subclass(Tagged), ffn.key_weight, ffn.value_weight, block_size=8,
                        top_k=3, backend="torch")
    assert ("block_ffn", "op") in seen and ("block_ffn", "body") not in seen, seen
