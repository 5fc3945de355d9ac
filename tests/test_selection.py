"""The paper's selection methods (issue 10): every method against the dense-masked reference on
every available backend (outputs, every gradient, the router's and the balancing loss's), the
hash and random methods' properties, block-usage counts, torch.compile, autodiff, checkpoints and
bad input."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from _cases import backend_device, make_problem, upcast

import sfnn
from sfnn import ops
from sfnn.reference import (
    block_ffn_ref,
    random_blocks_ref,
    router_logits_ref,
    select_ref,
    sparse_ffn_ref,
    topk_ref,
)
from sfnn.selection import (
    balanced_hash_table,
    call_seed,
    random_blocks,
    usage_summary,
)
from sfnn.testing import TOLERANCES, assert_close

ROUTERS = ("switch", "moe")
VOCAB = 50
HAS_TRITON = ops.triton_import_error() is None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _backends():
    return ["torch"] + (["triton"] if HAS_TRITON else [])


def _setup(method, T=11, d=24, d_ff=96, g=8, k=3, *, dtype=torch.float32, device="cpu",
           bias=True):
    """A problem and the method's arguments for sparse_ffn."""
    x, keys, values, kb, ob = make_problem(T, d, d_ff, bias=bias, dtype=dtype, device=device,
                                           requires_grad=True)
    nb = d_ff // g
    gen = torch.Generator().manual_seed(7 + T)
    margs = {}
    if method in ROUTERS:
        router = torch.randn(nb, d, generator=gen) * 0.5
        margs["router_weight"] = router.to(device=device, dtype=dtype).requires_grad_()
    if method == "hash":
        margs["token_ids"] = torch.randint(0, VOCAB, (T,), generator=gen).to(device)
        margs["hash_table"] = balanced_hash_table(VOCAB, nb, k, seed=3).to(device)
    if method == "random":
        margs["seed"] = 1234
    return (x, keys, values, kb, ob), margs


def check_method(method, backend, dtype, *, act="gelu", bias=True, **shape):
    """sparse_ffn(selection=method) on ``backend`` against the float64 reference: indices,
    gates, y, the aux loss and every gradient of ``(y * dy).sum() + aux_loss``."""
    dev = backend_device(backend)
    shape = {"T": 11, "d": 24, "d_ff": 96, "g": 8, "k": 3, **shape}
    (x, keys, values, kb, ob), margs = _setup(method, dtype=dtype, device=dev, bias=bias,
                                              **shape)
    g, k = shape["g"], shape["k"]
    y, sel = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=k, key_bias=kb, out_bias=ob,
                             activation=act, backend=backend, selection=method,
                             balance_loss_weight=0.5, z_loss_weight=0.1, return_selection=True,
                             **margs)
    dy = torch.randn_like(y)
    ((y * dy).float().sum() + sel.aux_loss).backward()
    params = [x, keys, values, kb, ob]
    names = ["dx", "dkeys", "dvalues", "dkey_bias", "dout_bias"]
    router = margs.get("router_weight")
    ref_args = dict(margs)
    if router is not None:
        params.append(router)
        names.append("drouter_weight")
        ref_args["router_weight"] = upcast(router)[0]
    ref = upcast(*params[:5]) + ([ref_args["router_weight"]] if router is not None else [])
    yr, idx_r, gates_r, bal_r, z_r = sparse_ffn_ref(
        ref[0], ref[1], ref[2], block_size=g, top_k=k, key_bias=ref[3], out_bias=ref[4],
        activation=act, selection=method, return_selection=True, **ref_args)
    ((yr * dy.double()).sum() + 0.5 * bal_r + 0.1 * z_r).backward()

    assert sel.indices.dtype == torch.int32 and sel.indices.shape == (shape["T"], k)
    assert torch.equal(sel.indices.cpu(), idx_r.cpu()), "indices differ from the reference"
    assert (sel.indices.sort(-1).values.diff(dim=-1) > 0).all(), "blocks not distinct"
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")
    if method in ROUTERS:
        assert sel.gates.dtype == torch.float32
        assert_close(sel.gates, gates_r, atol=1e-5, rtol=1e-4, name="gates")
        assert_close(sel.balance_loss, bal_r, atol=1e-5, rtol=1e-4, name="balance_loss")
        assert_close(sel.z_loss, z_r, atol=1e-5, rtol=1e-4, name="z_loss")
        assert_close(sel.aux_loss, 0.5 * bal_r + 0.1 * z_r, atol=1e-5, rtol=1e-4, name="aux")
        if shape["T"]:
            assert float(bal_r.detach()) > 0 and float(z_r.detach()) > 0
    else:
        assert sel.gates is None and gates_r is None
        assert float(sel.aux_loss) == 0.0 and float(sel.balance_loss) == 0.0
    if not shape["T"]:
        return
    scale = 1.0 if dtype == torch.float32 else 4.0
    for name, got, want in zip(names, params, ref, strict=True):
        if want is None:
            continue
        assert got.grad is not None, name
        assert_close(got.grad, want.grad, atol=atol * scale, rtol=rtol * scale, name=name)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("method", sfnn.METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_method_matches_reference_torch(method, dtype):
    check_method(method, "torch", dtype)


@pytest.mark.skipif(not HAS_TRITON, reason=f"Triton unavailable: {ops.triton_import_error()}")
@pytest.mark.parametrize("method", sfnn.METHODS)
@pytest.mark.parametrize("dtype", [DTYPES[0], DTYPES[2]])
def test_method_matches_reference_triton(method, dtype):
    check_method(method, "triton", dtype, act="silu")


@pytest.mark.parametrize("method", sfnn.METHODS)
@pytest.mark.parametrize("shape", [
    pytest.param(dict(T=17, d=20, d_ff=60, g=4, k=1, act="relu", bias=False), id="k1-nobias"),
    pytest.param(dict(T=9, d=16, d_ff=64, g=16, k=4, act="silu"), id="k-all-blocks"),
    pytest.param(dict(T=0, d=16, d_ff=64, g=16, k=2, act="relu"), id="no-tokens"),
])
def test_method_matches_reference_other_shapes(method, shape):
    check_method(method, "torch", torch.float32, **shape)


@pytest.mark.parametrize("method", ROUTERS)
@pytest.mark.parametrize("backend", _backends())
def test_balancing_and_z_loss_gradients_match_reference(method, backend):
    """The router's gradient from each loss alone (the FFN's output takes no part)."""
    dev = backend_device(backend)
    (x, keys, values, kb, ob), margs = _setup(method, device=dev)
    router = margs["router_weight"]
    for loss_name in ("balance_loss", "z_loss"):
        router.grad, x.grad = None, None
        _, sel = sfnn.sparse_ffn(x, keys, values, block_size=8, top_k=3, key_bias=kb,
                                 out_bias=ob, backend=backend, selection=method,
                                 return_selection=True, **margs)
        getattr(sel, loss_name).backward()
        xr, rr = upcast(x, router)
        _, _, bal, z = select_ref(xr, method, top_k=3, n_blocks=12, router_weight=rr)
        (bal if loss_name == "balance_loss" else z).backward()
        assert float(rr.grad.abs().max()) > 1e-4, "the reference gradient is trivially zero"
        assert_close(router.grad, rr.grad, name=f"d{loss_name}/drouter")
        assert_close(x.grad, xr.grad, name=f"d{loss_name}/dx")


def test_balancing_loss_is_one_at_uniform_load_and_top_k_over_n_when_collapsed():
    """n_blocks * sum f_b P_b: 1 for a uniform router on a uniform load; n_blocks * P when
    every assignment goes to one block (f = 1 there)."""
    T, d, nb = 12, 8, 4
    x = torch.randn(T, d)
    keys, values = torch.randn(nb * 2, d), torch.randn(nb * 2, d)
    zero_router = torch.zeros(nb, d)  # every probability 1/nb; ties: blocks 0..k-1 for all
    _, sel = sfnn.sparse_ffn(x, keys, values, block_size=2, top_k=nb, selection="switch",
                             router_weight=zero_router, return_selection=True)
    assert abs(float(sel.balance_loss) - 1.0) < 1e-6
    assert abs(float(sel.z_loss) - math.log(nb) ** 2) < 1e-5
    _, sel = sfnn.sparse_ffn(x, keys, values, block_size=2, top_k=1, selection="switch",
                             router_weight=zero_router, return_selection=True)
    assert torch.equal(sel.indices, torch.zeros(T, 1, dtype=torch.int32))
    assert abs(float(sel.balance_loss) - nb * 1.0 * (1 / nb)) < 1e-6


def test_routing_is_dropless():
    """A router that sends every token to one block: every token is still computed there (no
    capacity factor)."""
    T, d, g, nb = 40, 8, 4, 6
    x, keys, values, kb, ob = make_problem(T, d, g * nb)
    x = x.abs() + 0.1
    router = torch.zeros(nb, d)
    router[2] = 5.0  # block 2 wins for every token with positive features
    y, sel = sfnn.sparse_ffn(x, keys, values, block_size=g, top_k=1, key_bias=kb, out_bias=ob,
                             selection="switch", router_weight=router, return_selection=True)
    assert torch.equal(sel.indices, torch.full((T, 1), 2, dtype=torch.int32))
    want = block_ffn_ref(x, keys, values, sel.indices, block_size=g, key_bias=kb, out_bias=ob,
                         gates=sel.gates)
    assert_close(y, want, name="y")
    assert not torch.allclose(y, ob.expand_as(y))


@pytest.mark.parametrize("backend", _backends())
def test_exact_top_k_over_cells_is_avgk_with_block_size_1(backend):
    """block_size=1: a block is one cell, its mean key is the key, so Avg-K keeps the top_k
    cells by pre-activation: the paper's unrestricted memory."""
    dev = backend_device(backend)
    T, d, d_ff, k = 13, 16, 40, 5
    x, keys, values, kb, ob = make_problem(T, d, d_ff, device=dev, requires_grad=True)
    y, sel = sfnn.sparse_ffn(x, keys, values, block_size=1, top_k=k, key_bias=kb, out_bias=ob,
                             activation="gelu", backend=backend, return_selection=True)
    xr, kr, vr, kbr, obr = upcast(x, keys, values, kb, ob)
    pre = xr @ kr.t() + kbr
    cells = topk_ref(pre, k)
    assert torch.equal(sel.indices.cpu(), cells.cpu())
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, cells.long(), True)
    yr = torch.where(mask, torch.nn.functional.gelu(pre), 0.0) @ vr + obr
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy.double())
    assert_close(y, yr, name="y")
    for name, got, want in (("dx", x, xr), ("dkeys", keys, kr), ("dvalues", values, vr),
                            ("dkey_bias", kb, kbr)):
        assert_close(got.grad, want.grad, name=name)


# --------------------------------------------------------------------------- hash

@pytest.mark.parametrize("vocab,n_blocks,top_k", [
    (1000, 24, 5), (1000, 24, 4), (777, 13, 13), (3, 16, 2), (5000, 7, 3), (4099, 128, 16)])
def test_hash_table_is_distinct_balanced_and_seeded(vocab, n_blocks, top_k):
    table = balanced_hash_table(vocab, n_blocks, top_k, seed=11)
    assert table.dtype == torch.int32 and table.shape == (vocab, top_k)
    assert int(table.min()) >= 0 and int(table.max()) < n_blocks
    assert (table.sort(-1).values.diff(dim=-1) > 0).all(), "blocks repeat within a token"
    counts = torch.bincount(table.reshape(-1).long(), minlength=n_blocks)
    share = vocab * top_k / n_blocks
    assert int(counts.max()) - int(counts.min()) <= 1
    assert (counts - share).abs().max() <= 1
    assert torch.equal(table, balanced_hash_table(vocab, n_blocks, top_k, seed=11))
    if vocab * top_k > n_blocks:
        assert not torch.equal(table, balanced_hash_table(vocab, n_blocks, top_k, seed=12))


@pytest.mark.parametrize("backend", _backends())
def test_hash_same_id_same_blocks(backend):
    dev = backend_device(backend)
    (x, keys, values, kb, ob), margs = _setup("hash", T=14, device=dev)
    ids = torch.tensor([3, 7, 3, 3, 49, 0, 7, 12, 3, 0, 49, 1, 2, 3], device=dev)
    margs["token_ids"] = ids.reshape(2, 7)
    y, sel = sfnn.sparse_ffn(x.reshape(2, 7, -1), keys, values, block_size=8, top_k=3,
                             key_bias=kb, out_bias=ob, backend=backend, selection="hash",
                             return_selection=True, **margs)
    idx = sel.indices.reshape(14, 3)
    assert torch.equal(idx, margs["hash_table"][ids.long()].to(torch.int32))
    for v in ids.unique():
        rows = idx[ids == v]
        assert (rows == rows[0]).all()
    assert y.shape == (2, 7, 24)


def test_hash_module_table_is_a_seeded_buffer():
    a = sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection="hash", vocab_size=300, seed=4)
    b = sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection="hash", vocab_size=300, seed=4)
    assert torch.equal(a.hash_table, b.hash_table)
    assert torch.equal(a.hash_table, balanced_hash_table(300, 12, 3, seed=4))
    assert "hash_table" in a.state_dict()
    torch.manual_seed(0)
    c = sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection="hash", vocab_size=300)
    torch.manual_seed(0)
    d = sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection="hash", vocab_size=300)
    assert torch.equal(c.hash_table, d.hash_table)


# --------------------------------------------------------------------------- random

@pytest.mark.parametrize("seed", [0, 1, -5, 2**62 + 3, -(2**63)])
def test_random_draws_match_the_numpy_oracle(seed):
    got = random_blocks(300, 37, 5, seed)
    assert torch.equal(got, random_blocks_ref(300, 37, 5, seed))
    assert torch.equal(random_blocks(300, 37, 5, torch.tensor(seed)), got)
    assert (got.sort(-1).values.diff(dim=-1) > 0).all()


def test_random_draws_are_uniform():
    idx = random_blocks(60_000, 10, 3, 99)
    per_block = torch.bincount(idx.reshape(-1).long(), minlength=10).double() / 180_000
    first_slot = torch.bincount(idx[:, 0].long(), minlength=10).double() / 60_000
    assert (per_block - 0.1).abs().max() < 0.005
    assert (first_slot - 0.1).abs().max() < 0.008
    pairs = torch.bincount((idx[:, 0] * 10 + idx[:, 1]).long(), minlength=100).reshape(10, 10)
    off = pairs[~torch.eye(10, dtype=torch.bool)].double() / 60_000
    assert int(pairs.diag().sum()) == 0 and (off - 1 / 90).abs().max() < 0.003


def test_random_seeded_calls_repeat_and_distinct():
    (x, keys, values, kb, ob), _ = _setup("random", T=30)

    def run(seed):
        return sfnn.sparse_ffn(x, keys, values, block_size=8, top_k=3, selection="random",
                               seed=seed, return_selection=True)

    y1, s1 = run(5)
    y2, s2 = run(5)
    assert torch.equal(s1.indices, s2.indices) and torch.equal(y1, y2)
    assert not torch.equal(run(6)[1].indices, s1.indices)
    assert (s1.indices.sort(-1).values.diff(dim=-1) > 0).all()
    assert torch.equal(run(torch.tensor(5))[1].indices, s1.indices)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = run(g1)[1].indices, run(g2)[1].indices
    assert torch.equal(a, b)
    assert not torch.equal(run(g1)[1].indices, a), "a generator gives a fresh draw per call"
    torch.manual_seed(21)
    c = run(None)[1].indices
    torch.manual_seed(21)
    assert torch.equal(run(None)[1].indices, c)


def test_random_module_stream_repeats_and_resumes_from_a_checkpoint():
    def layer():
        return sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection="random", seed=8,
                              track_usage=True)

    a, b = layer(), layer()
    b.load_state_dict(a.state_dict())
    x = torch.randn(25, 16)
    ya = [a(x) for _ in range(3)]
    yb = [b(x) for _ in range(3)]
    for u, v in zip(ya, yb, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(ya[0], ya[1]), "each call draws anew"
    assert int(a.random_calls) == 3
    c = layer()
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(x), a(x)), "a checkpoint resumes the stream"
    draws = torch.cat([random_blocks_ref(25, 12, 3, call_seed(8, torch.tensor(i)))
                       for i in range(4)])
    assert torch.equal(a.usage_counts, torch.bincount(draws.reshape(-1).long(), minlength=12))


# --------------------------------------------------------------------------- usage

def _oracle_indices(ffn, x, ids, call):
    """The blocks a layer chooses for x on its ``call``-th call, from the reference."""
    x2d = x.reshape(-1, x.shape[-1])
    return select_ref(x2d, ffn.selection, top_k=ffn.top_k, n_blocks=ffn.n_blocks,
                      keys=ffn.key_weight, key_bias=ffn.key_bias, block_size=ffn.block_size,
                      router_weight=ffn.router_weight, token_ids=ids.reshape(-1),
                      hash_table=ffn.hash_table,
                      seed=None if ffn.random_seed is None else call_seed(
                          ffn.random_seed, torch.tensor(call)))[0]


@pytest.mark.parametrize("method", sfnn.METHODS)
def test_usage_counts_equal_a_bincount_of_the_chosen_blocks(method):
    torch.manual_seed(1)
    ffn = sfnn.SparseFFN(16, 96, block_size=8, top_k=3, selection=method, vocab_size=VOCAB,
                         track_usage=True)
    expected = torch.zeros(12, dtype=torch.int64)
    for call, T in enumerate((7, 30)):
        x = torch.randn(T, 16)
        ids = torch.randint(0, VOCAB, (T,))
        ffn(x, token_ids=ids).sum().backward()
        idx = _oracle_indices(ffn, x, ids, call)
        expected += torch.bincount(idx.reshape(-1).long(), minlength=12)
    assert ffn.usage_counts.dtype == torch.int64
    assert torch.equal(ffn.usage_counts, expected)
    stats = ffn.usage_stats()
    assert stats["total"] == 37 * 3 and torch.equal(stats["counts"], expected)
    ffn.reset_usage()
    assert int(ffn.usage_counts.sum()) == 0
    ffn.track_usage = False
    ffn(torch.randn(4, 16), token_ids=torch.zeros(4, dtype=torch.long))
    assert int(ffn.usage_counts.sum()) == 0
    with pytest.raises(RuntimeError, match="track_usage=True"):
        ffn.usage_stats()


def test_random_stream_and_usage_under_inference_mode():
    """The call counter and the usage counts are updated in place under inference_mode too, and
    the layer keeps working outside it."""
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection="random", track_usage=True,
                         seed=1)
    with torch.inference_mode():
        ffn(torch.randn(3, 16))
    ffn(torch.randn(4, 16)).sum().backward()
    assert int(ffn.random_calls) == 2 and int(ffn.usage_counts.sum()) == 14


def test_usage_summary_values():
    s = usage_summary(torch.tensor([4, 0, 2, 2]))
    assert s["total"] == 8
    assert s["cv"] == pytest.approx(math.sqrt(2) / 2)
    assert s["entropy"] == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(4)) / math.log(4))
    assert s["dead_fraction"] == 0.25 and s["max_over_mean"] == pytest.approx(2.0)
    u = usage_summary(torch.full((5,), 3))
    assert u["cv"] == 0 and u["entropy"] == pytest.approx(1.0) and u["dead_fraction"] == 0
    assert u["max_over_mean"] == 1.0
    e = usage_summary(torch.zeros(3, dtype=torch.int64))
    assert e["total"] == 0 and e["dead_fraction"] == 1.0 and math.isnan(e["cv"])


def test_usage_off_by_default_and_counts_are_not_saved():
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2)
    assert not ffn.track_usage
    ffn(torch.randn(5, 16))
    assert int(ffn.usage_counts.sum()) == 0
    assert "usage_counts" not in ffn.state_dict()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", sfnn.METHODS)
def test_no_host_sync_on_cuda(method):
    """Selection, usage counting, the aux loss and the backward never wait for the GPU."""
    backend = "triton" if HAS_TRITON else "torch"
    ffn = sfnn.SparseFFN(64, 512, block_size=32, top_k=4, selection=method, vocab_size=VOCAB,
                         track_usage=True, backend=backend, device="cuda")
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    ids = torch.randint(0, VOCAB, (300,), device="cuda")
    for _ in range(2):  # compile and tune first
        (ffn(x, token_ids=ids).sum() + sfnn.aux_loss(ffn)).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (ffn(x, token_ids=ids).sum() + sfnn.aux_loss(ffn)).backward()
        with torch.no_grad():
            ffn(x, token_ids=ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ffn.usage_stats()["total"] == 4 * 300 * 4


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", sfnn.METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_decode_path_runs_every_method(method, dtype):
    from sfnn import cuda_ext

    if not cuda_ext.available():
        pytest.skip(cuda_ext.unavailable_reason())
    (x, keys, values, kb, ob), margs = _setup(method, T=5, d=64, d_ff=512, g=32, k=4,
                                              dtype=dtype, device="cuda")
    with torch.no_grad():
        y, sel = sfnn.sparse_ffn(x, keys, values, block_size=32, top_k=4, key_bias=kb,
                                 out_bias=ob, backend="cuda", selection=method,
                                 return_selection=True, **margs)
    xr, kr, vr, kbr, obr = upcast(x, keys, values, kb, ob)
    yr = block_ffn_ref(xr, kr, vr, sel.indices, block_size=32, key_bias=kbr, out_bias=obr,
                       gates=sel.gates)
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, yr, atol=atol, rtol=rtol, name="y")


# --------------------------------------------------------------------------- compile, autodiff

@pytest.mark.parametrize("method", sfnn.METHODS)
def test_compile_fullgraph_every_method(method):
    """torch.compile(fullgraph=True) of the layer: output, gradients, aux loss, usage counts
    and the random stream as in eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    eager = sfnn.SparseFFN(16, 64, block_size=8, top_k=3, selection=method, vocab_size=VOCAB,
                           track_usage=True, backend="torch", activation="gelu",
                           z_loss_weight=0.01)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for T in (9, 6):
        x = torch.randn(T, 16, requires_grad=True)
        ids = torch.randint(0, VOCAB, (T,))
        y = compiled(x, token_ids=ids)
        (y.square().sum() + sfnn.aux_loss(layer)).backward()
        xe = x.detach().clone().requires_grad_()
        ye = eager(xe, token_ids=ids)
        (ye.square().sum() + sfnn.aux_loss(eager)).backward()
        assert_close(y, ye, name="y")
        assert_close(x.grad, xe.grad, name="dx")
        assert_close(layer.aux_loss(), eager.aux_loss(), name="aux")
    for (name, p), pe in zip(layer.named_parameters(), eager.parameters(), strict=True):
        assert_close(p.grad, pe.grad, name=f"d{name}")
    assert torch.equal(layer.usage_counts, eager.usage_counts)
    if method == "random":
        assert int(layer.random_calls) == 2


@pytest.mark.slow
def test_compile_inductor_random():
    """Inductor's code for the counter-based hash (int64 shifts, masks and products) gives the
    same draws as eager mode."""
    torch._dynamo.reset()
    ffn = sfnn.SparseFFN(16, 48, block_size=8, top_k=2, selection="random", backend="torch",
                         track_usage=True, seed=3)
    twin = copy.deepcopy(ffn)
    x = torch.randn(11, 16, requires_grad=True)
    y = torch.compile(ffn, fullgraph=True)(x)
    y.sum().backward()
    assert_close(y, twin(x.detach()), name="y")
    assert torch.equal(ffn.usage_counts, twin.usage_counts)


def _router_fn(method, margs, act="gelu", **kw):
    def f(x, keys, values, kb, ob, router):
        return sfnn.sparse_ffn(x, keys, values, block_size=3, top_k=2, key_bias=kb,
                               out_bias=ob, activation=act, selection=method,
                               router_weight=router, **margs, **kw)
    return f


@pytest.mark.parametrize("method", ROUTERS)
def test_jvp_through_router_gates_matches_reference(method):
    x, keys, values, kb, ob = make_problem(7, 5, 12, dtype=torch.float64)
    router = torch.randn(4, 5, dtype=torch.float64)
    primals = (x, keys, values, kb, ob, router)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def ref(x, keys, values, kb, ob, router):
        return sparse_ffn_ref(x, keys, values, block_size=3, top_k=2, key_bias=kb, out_bias=ob,
                              activation="gelu", selection=method, router_weight=router)

    y, t = torch.func.jvp(_router_fn(method, {}), primals, tangents)
    y_ref, t_ref = torch.func.jvp(ref, primals, tangents)
    assert_close(y, y_ref, name="y")
    assert_close(t, t_ref, name="tangent")
    only_router = tuple(torch.zeros_like(p) for p in primals[:5]) + (tangents[5],)
    _, t_r = torch.func.jvp(_router_fn(method, {}), primals, only_router)
    assert float(t_r.abs().max()) > 1e-3, "the router's tangent reaches the output"


@pytest.mark.parametrize("method", ROUTERS)
def test_double_backward_through_router_gates(method):
    x, keys, values, kb, ob = make_problem(5, 4, 12, dtype=torch.float64, requires_grad=True)
    router = (torch.randn(4, 4, dtype=torch.float64) * 0.5).requires_grad_()
    f = _router_fn(method, {}, act="silu", backend="torch")
    assert torch.autograd.gradgradcheck(lambda x, r: f(x, keys, values, kb, ob, r),
                                        (x, router), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_vmap_of_grad_with_a_router_gives_per_sample_gradients():
    x, keys, values, kb, ob = make_problem(5, 6, 12, dtype=torch.float64)
    router = torch.randn(4, 6, dtype=torch.float64)

    def loss(r, xi):
        return sfnn.sparse_ffn(xi[None], keys, values, block_size=3, top_k=2, key_bias=kb,
                               out_bias=ob, selection="moe", router_weight=r).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(router, x)
    for i in range(5):
        r = router.clone().requires_grad_()
        sparse_ffn_ref(x[i:i + 1], keys, values, block_size=3, top_k=2, key_bias=kb,
                       out_bias=ob, selection="moe", router_weight=r).square().sum().backward()
        assert_close(per_sample[i], r.grad, name=f"sample {i}")


def test_router_runs_in_float32_under_autocast():
    """Under autocast the FFN runs in bf16, the router's logits in float32 from the stored
    (float32) router weight."""
    ffn = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection="switch")
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ffn(x)
    assert y.dtype == torch.bfloat16
    want = topk_ref(router_logits_ref(x.bfloat16(), ffn.router_weight), 2)
    ffn.usage_counts.zero_()
    ffn.track_usage = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ffn(x)
    assert torch.equal(ffn.usage_counts, torch.bincount(want.reshape(-1).long(), minlength=8))


# --------------------------------------------------------------------------- module API

def test_aux_loss_sums_every_sparse_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection="switch"),
        torch.nn.ReLU(),
        sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection="moe", z_loss_weight=0.001),
        sfnn.SparseFFN(16, 64, block_size=8, top_k=2),
    )
    assert float(sfnn.aux_loss(model)) == 0.0, "zero before any forward"
    model(torch.randn(10, 16))
    total = sfnn.aux_loss(model)
    assert_close(total, model[0].aux_loss() + model[2].aux_loss(), name="sum")
    assert float(total.detach()) > 0 and total.requires_grad
    total.backward()
    assert model[0].router_weight.grad is not None and model[2].router_weight.grad is not None
    assert float(sfnn.aux_loss(torch.nn.Linear(2, 2))) == 0.0
    assert model[3].router_weight is None and float(model[3].aux_loss()) == 0.0
    copy.deepcopy(model)  # the last aux loss (with its graph) is not copied
    torch.save(model, io.BytesIO())


def test_module_state_dict_round_trips_every_method():
    for method in sfnn.METHODS:
        a = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection=method, vocab_size=40)
        b = sfnn.SparseFFN(16, 64, block_size=8, top_k=2, selection=method, vocab_size=40)
        b.load_state_dict(a.state_dict())
        x, ids = torch.randn(6, 16), torch.randint(0, 40, (6,))
        assert torch.equal(a(x, token_ids=ids), b(x, token_ids=ids)), method
        assert method in repr(a)


# --------------------------------------------------------------------------- bad input

def test_unknown_method_is_a_clear_error():
    x, keys, values, _, _ = make_problem(4, 16, 64)
    with pytest.raises(ValueError, match=r"selection must be one of .*'avgk'.*got 'top1'"):
        sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="top1")
    with pytest.raises(ValueError, match="selection must be one of"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="Switch")


def test_hash_needs_vocab_size_and_token_ids_in_range():
    with pytest.raises(ValueError, match=r"selection='hash' needs vocab_size"):
        sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="hash")
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="hash", vocab_size=10)
    x = torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match=r"token_ids=ids"):
        ffn(x)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, vocab_size=10\)"):
        ffn(x, token_ids=torch.full((3, 4), 10))
    with pytest.raises(ValueError, match=r"token_ids must lie in"):
        ffn(x, token_ids=torch.full((3, 4), -1))
    with pytest.raises(ValueError, match=r"leading shape \(3, 4\)"):
        ffn(x, token_ids=torch.zeros(12, dtype=torch.long))
    with pytest.raises(TypeError, match="token_ids must be an integer tensor"):
        ffn(x, token_ids=torch.zeros(3, 4))
    keys, values = ffn.key_weight, ffn.value_weight
    with pytest.raises(ValueError, match="needs hash_table"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="hash",
                        token_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"hash_table must be \(vocab_size, top_k=2\)"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="hash",
                        token_ids=torch.zeros(3, 4, dtype=torch.long),
                        hash_table=balanced_hash_table(10, 4, 3))
    bad = ffn.hash_table.clone()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match=r"hash_table entries must lie in \[0, n_blocks=4\)"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="hash",
                        token_ids=torch.zeros(3, 4, dtype=torch.long), hash_table=bad)
    avgk = sfnn.SparseFFN(16, 64, block_size=16, top_k=2)
    assert avgk(x, token_ids=torch.zeros(3, 4, dtype=torch.long)).shape == x.shape


def test_router_arguments_are_checked():
    x, keys, values, _, _ = make_problem(4, 16, 64)
    with pytest.raises(ValueError, match=r"selection='moe' needs router_weight.*\(4, 16\)"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="moe")
    with pytest.raises(ValueError, match=r"router_weight must be \(n_blocks, d_model\)"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="switch",
                        router_weight=torch.randn(5, 16))
    with pytest.raises(ValueError, match="router_weight is used only by"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, router_weight=torch.randn(4, 16))
    with pytest.raises(TypeError, match="share one dtype"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="switch",
                        router_weight=torch.randn(4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="seed is used only by selection='random'"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, seed=3)
    with pytest.raises(TypeError, match="seed must be"):
        sfnn.sparse_ffn(x, keys, values, block_size=16, top_k=2, selection="random", seed=1.5)
    with pytest.raises(ValueError, match="balance_loss_weight must be a float >= 0"):
        sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="switch",
                       balance_loss_weight=-1)


def test_router_on_a_layer_loaded_without_one():
    avgk = sfnn.SparseFFN(16, 64, block_size=16, top_k=2)
    switch = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="switch")
    with pytest.raises(RuntimeError, match=r"router_weight: the checkpoint comes from a layer "
                                           r"without router_weight.*selection='switch'.*"
                                           r"strict=False"):
        switch.load_state_dict(avgk.state_dict())
    with pytest.raises(RuntimeError, match=r"router_weight is kept by selection='switch' or "
                                           r"'moe'.*selection='switch'"):
        avgk.load_state_dict(switch.state_dict())
    router = switch.router_weight.detach().clone()
    result = switch.load_state_dict(avgk.state_dict(), strict=False)  # keeps its own router
    assert result.missing_keys == ["router_weight"]
    assert torch.equal(switch.router_weight, router)
    assert torch.equal(switch.key_weight, avgk.key_weight)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), switch)
    with pytest.raises(RuntimeError, match=r'"1.router_weight: the checkpoint comes from'):
        model.load_state_dict(torch.nn.Sequential(torch.nn.Linear(16, 16), avgk).state_dict())
    hashed = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="hash", vocab_size=30)
    with pytest.raises(RuntimeError, match=r"hash_table: the checkpoint comes from"):
        hashed.load_state_dict(avgk.state_dict())
    bigger = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="hash", vocab_size=31)
    with pytest.raises(RuntimeError, match=r"build the layer with vocab_size=31"):
        hashed.load_state_dict(bigger.state_dict())
    rand = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, selection="random")
    with pytest.raises(RuntimeError, match=r"random_seed is kept by selection='random'"):
        avgk.load_state_dict(rand.state_dict())


# --------------------------------------------------------------------------- block parallel

def _block_parallel_methods(rank, world):
    """Every method in BlockParallelSparseFFN against single-device computations of every
    rank's tokens: outputs, dx, the shards' gradients, the replicated router's all-reduced
    gradient and each rank's aux loss."""
    from sfnn.distributed import BlockParallelSparseFFN

    tokens = [5, 0, 7, 3][:world]
    for method in sfnn.METHODS:
        torch.manual_seed(0)
        full = sfnn.SparseFFN(24, 96, block_size=4, top_k=3, selection=method, vocab_size=40,
                              backend="torch", activation="gelu", z_loss_weight=0.01)
        layer = BlockParallelSparseFFN.from_sparse_ffn(full)
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(t, 24, generator=gen) for t in tokens]
        dys = [torch.randn(t, 24, generator=gen) for t in tokens]
        ids = [torch.randint(0, 40, (t,), generator=gen) for t in tokens]
        x = xs[rank].clone().requires_grad_()
        y = layer(x, token_ids=ids[rank])
        (y * dys[rank]).sum().backward()
        loss, want = 0.0, None
        for r in range(world):
            xr = xs[r].clone().requires_grad_()
            if method == "random":
                seed = call_seed(call_seed(full.random_seed, torch.tensor(1)), r)
                idx = random_blocks_ref(tokens[r], 24, 3, seed)
                yr = sfnn.block_ffn(xr, full.key_weight, full.value_weight, idx, block_size=4,
                                    key_bias=full.key_bias, out_bias=full.out_bias,
                                    activation="gelu")
            else:
                yr = full(xr, token_ids=ids[r])
            if r == rank:
                want, x_want, aux_want = yr, xr, full.aux_loss().detach()
            loss = loss + (yr * dys[r]).sum()
        loss.backward()
        assert_close(y, want, name=f"{method} rank {rank}: y")
        assert_close(x.grad, x_want.grad, name=f"{method} rank {rank}: dx")
        n = 96 // world
        for name in ("key_weight", "value_weight", "key_bias"):
            want_g = getattr(full, name).grad[rank * n:(rank + 1) * n]
            assert_close(getattr(layer, name).grad, want_g, name=f"{method}: d{name}")
        assert_close(layer.out_bias.grad, full.out_bias.grad, name=f"{method}: dout_bias")
        if method in ROUTERS:
            assert_close(layer.router_weight.grad, full.router_weight.grad,
                         name=f"{method}: drouter_weight")
            assert float(layer.aux_loss()) > 0 or tokens[rank] == 0
            assert_close(layer.aux_loss(), aux_want, name=f"{method}: aux loss")
        else:
            assert float(sfnn.aux_loss(layer)) == 0.0
        back = layer.gather_full()
        for name in ("router_weight", "hash_table", "random_seed", "random_calls"):
            mine, theirs = getattr(back, name), getattr(full, name)
            assert (mine is None) == (theirs is None), name
            if name == "random_calls" and mine is not None:
                assert int(mine) == 1
            elif mine is not None:
                assert torch.equal(mine, theirs), name
    # hash without token ids: every rank raises, at once
    torch.manual_seed(0)
    layer = BlockParallelSparseFFN(24, 96, block_size=4, top_k=3, selection="hash",
                                   vocab_size=40)
    with pytest.raises(ValueError if rank == 0 else RuntimeError,
                       match="token_ids=ids" if rank == 0 else r"rank\(s\) \[0\]"):
        layer(torch.randn(3, 24), token_ids=None if rank == 0 else torch.zeros(3).long())


@pytest.mark.parametrize("world", [1, 2])
def test_block_parallel_every_method(world):
    from test_distributed import launch

    launch(world, _block_parallel_methods)


# --------------------------------------------------------------------------- benchmark hooks

def test_selection_providers_run_in_the_sweep():
    """bench/sweeplib registers each method as a provider; each builds and runs a tiny case in
    every mode (the sweep times them at the acceptance shape)."""
    import importlib
    import pathlib
    import sys

    bench = str(pathlib.Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        cases = importlib.import_module("sweeplib.cases")
        providers = importlib.import_module("sweeplib.providers")
    finally:
        sys.path.remove(bench)
    assert set(sfnn.METHODS) - {"avgk"} <= set(providers.PROVIDERS)
    selection_cases = [c for c in cases.preset_default("cpu") if c.tag == "selection"]
    assert {c.mode for c in selection_cases} == {"forward", "forward+backward"}
    for c in selection_cases:
        assert (c.tokens, c.d_model, c.d_ff, c.block_size, c.top_k, c.dtype) == (
            4096, 512, 8192, 64, 16, "float32")
    for mode in ("forward", "forward+backward", "decode"):
        case = cases.Case(8, 16, 64, 8, 2, mode, providers=cases.SELECTION_PROVIDERS)
        case.validate()
        pb = providers.Problem(case, "cpu")
        for name in cases.SELECTION_PROVIDERS:
            run, y0 = providers.make_runner(name, pb)
            run()
            assert y0.shape == (8, 16) and torch.isfinite(y0).all(), (name, mode)


def test_selection_cost_bench_writes_its_tables(tmp_path, monkeypatch):
    """bench/selection_cost.py on a tiny shape: every variant and mode timed, the paired table,
    the usage line and the provenance header in --out; a subset keeps only what was asked."""
    import importlib.util
    import pathlib
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "selection_cost.py"
    spec = importlib.util.spec_from_file_location("selection_cost", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = ["--tokens", "16", "--d-model", "16", "--d-ff", "64", "--block-size", "8",
            "--top-k", "2", "--vocab", "50", "--rounds", "2", "--threads", "1"]
    threads = torch.get_num_threads()

    def run(*extra):
        monkeypatch.setattr(sys, "argv", ["selection_cost.py", *tiny, *extra])
        try:
            bench.main()
        finally:
            torch.set_num_threads(threads)

    out = tmp_path / "all.md"
    run("--clock", "cpu", "--out", str(out))
    text = out.read_text()
    assert text.startswith("# Selection cost beside Avg-K") and "sfnn " in text
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    for name in (*sfnn.METHODS, "avgk+usage"):
        assert name in rows, name
    assert "Paired per round" in text and "usage update alone" in text
    sub = tmp_path / "sub.md"
    run("--variants", "hash", "--modes", "forward", "--out", str(sub))
    lines = [ln for ln in sub.read_text().splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["variant", "avgk", "hash", "variant",
                                                          "hash"]
    with pytest.raises(SystemExit):
        run("--variants", "nope")
