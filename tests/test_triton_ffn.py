"""The Triton block-FFN launchers against the dense-masked reference.

Calls ``block_ffn_fwd`` / ``block_ffn_bwd`` directly (the backend protocol) and compares the
output and every gradient (dx, dkeys, dvalues, dkey_bias, dgates) with ``block_ffn_ref`` run in
float64 on upcast inputs. Without a GPU the kernels run in Triton's interpreter on CPU tensors
(small shapes); with one, on CUDA tensors, plus a large case.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not importable: the Triton kernels cannot run")

from sfnn.triton_kernels import block_ffn  # noqa: E402
from sfnn.triton_kernels.block_ffn import block_ffn_bwd, block_ffn_fwd  # noqa: E402
from sfnn.triton_kernels.routing import max_tiles, route  # noqa: E402

from sfnn.reference import block_ffn_ref  # noqa: E402
from sfnn.testing import TOLERANCES, assert_close  # noqa: E402

ON_CPU = not torch.cuda.is_available()
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


def _triton(p, *, g, activation, deterministic, save=True):
    y, saved, route = block_ffn_fwd(
        p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["out_bias"], p["gates"],
        block_size=g, activation=activation, save_for_backward=save,
        deterministic=deterministic)
    grads = block_ffn_bwd(
        p["dy"], p["x"], p["keys"], p["values"], p["indices"], p["key_bias"], p["gates"], saved,
        route, block_size=g, activation=activation, deterministic=deterministic)
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


def _check(p, *, g, activation, deterministic, save=True):
    out = _triton(p, g=g, activation=activation, deterministic=deterministic, save=save)
    ref = _reference(p, g=g, activation=activation)
    atol, rtol = TOLERANCES[p["x"].dtype]
    names = ("y", "dx", "dkeys", "dvalues", "dkey_bias", "dgates")
    for name, a, e in zip(names, out, ref, strict=True):
        if e is None:
            assert a is None, f"{name} should be None"
            continue
        assert a.dtype == (torch.float32 if name == "dgates" else p["x"].dtype), name
        assert_close(a, e, atol=atol, rtol=rtol, name=name)
    return out


# T, d, g, n_blocks, top_k, index mode: odd T and d, g below 16 and not a power of two,
# n_blocks not a power of two, top_k 1 / odd / == n_blocks, hot and unused blocks, duplicates.
SHAPES = [
    pytest.param(37, 40, 24, 5, 3, "distinct", id="T37-d40-g24-nb5-k3"),
    pytest.param(64, 32, 16, 6, 1, "distinct", id="T64-d32-g16-nb6-k1"),
    pytest.param(45, 24, 8, 4, 4, "distinct", id="T45-d24-g8-nb4-k4=nb"),
    pytest.param(101, 33, 32, 7, 3, "hot", id="T101-d33-g32-nb7-k3-hot"),
    pytest.param(53, 20, 16, 9, 2, "unused", id="T53-d20-g16-nb9-k2-unused"),
    pytest.param(41, 36, 20, 3, 3, "dup", id="T41-d36-g20-nb3-k3-dup"),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("T,d,g,nb,k,mode", SHAPES)
def test_shapes_fp32(T, d, g, nb, k, mode, deterministic, device, poison):
    p = _problem(T, d, g, nb, k, dtype=torch.float32, device=device, mode=mode)
    _check(p, g=g, activation="gelu", deterministic=deterministic)


@pytest.mark.parametrize("gates", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_activations_bias_gates(activation, bias, gates, device, poison):
    p = _problem(29, 24, 16, 5, 2, dtype=torch.float32, device=device, key_bias=bias,
                 out_bias=bias, gates=gates, mode="dup", seed=1)
    _check(p, g=16, activation=activation, deterministic=False)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_recompute_without_saved(deterministic, device, poison):
    """save_for_backward=False: the backward recomputes the pre-activation."""
    p = _problem(47, 40, 24, 4, 3, dtype=torch.float32, device=device, mode="hot", seed=2)
    _check(p, g=24, activation="silu", deterministic=deterministic, save=False)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(dtype, deterministic, device, poison):
    p = _problem(57, 48, 16, 6, 3, dtype=dtype, device=device, mode="hot", seed=3)
    _check(p, g=16, activation="gelu", deterministic=deterministic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_is_bitwise_repeatable(dtype, device):
    p = _problem(45, 40, 24, 5, 3, dtype=dtype, device=device, mode="hot", seed=4)
    first = _triton(p, g=24, activation="gelu", deterministic=True)
    second = _triton(p, g=24, activation="gelu", deterministic=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


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


def test_rejects_bad_arguments():
    p = _problem(8, 16, 16, 2, 1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        block_ffn_fwd(p["x"], p["keys"], p["values"], p["indices"], None, None, None,
                      block_size=12, activation="relu", save_for_backward=False,
                      deterministic=False)
    with pytest.raises(ValueError, match="activation"):
        block_ffn_fwd(p["x"], p["keys"], p["values"], p["indices"], None, None, None,
                      block_size=16, activation="tanh", save_for_backward=False,
                      deterministic=False)


def test_aot_specs_cover_every_dtype():
    specs = block_ffn.aot_specs()
    names = " ".join(s.name for s in specs)
    for kernel in ("block_ffn_fwd[", "block_ffn_bwd_dh[", "block_ffn_bwd_dx[",
                   "block_ffn_bwd_dw["):
        for t in ("bf16", "fp16", "fp32"):
            assert f"{kernel}{t}" in names, f"{kernel}{t}"
    for s in specs:
        # Tensor-core specs need a wgmma-sized M (token tile, or d_model chunk for dW);
        # true-fp32 ("ieee") dots have no tensor-core path and run on the FMA units.
        assert s.is_gemm == ("ieee" not in s.name), s.name
        if s.is_gemm:
            assert s.constexprs["BLOCK_T"] >= 64 or s.constexprs["BLOCK_D"] >= 64, s.name


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
