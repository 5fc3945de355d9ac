"""Triton block means and fused Avg-K top-K against the reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (small shapes); with a GPU
the same tests run on CUDA tensors, plus a large case past 65,536 tokens.

Most selection tests use *quantized* inputs (multiples of 1/4 in x and kbar, of 1/8 in bbar):
every product and partial sum is exact in fp32, and exact in bf16/fp16 for x, so scores equal
the reference bit for bit whatever the summation order, and indices must match exactly,
including the many exact ties (which go to the smaller block index). Continuous random inputs
check the same up to near-ties.
"""
from __future__ import annotations

import os

import pytest
import torch

# tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA, before any kernel import.
triton = pytest.importorskip("triton", reason="triton is not installed (Triton kernels untested)")

from sfnn.triton_kernels.avgk_topk import MAX_TOP_K, avgk_topk  # noqa: E402
from sfnn.triton_kernels.block_means import block_means  # noqa: E402

from sfnn.reference import block_means_ref, block_scores_ref, select_blocks_ref  # noqa: E402
from sfnn.testing import assert_close  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
needs_gpu = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA GPU (too large for the Triton interpreter on CPU)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantized(shape, scale, gen, lo=-4, hi=5):
    return torch.randint(lo, hi, shape, generator=gen).float() * scale


def _inputs(T, d, n_blocks, *, dtype=torch.float32, bias=True, seed=0, quantized=True):
    gen = torch.Generator().manual_seed(seed)
    if quantized:
        x = _quantized((T, d), 0.25, gen)
        kbar = _quantized((n_blocks, d), 0.25, gen)
        bbar = _quantized((n_blocks,), 0.125, gen) if bias else None
    else:
        x = torch.randn(T, d, generator=gen)
        kbar = torch.randn(n_blocks, d, generator=gen) / d**0.5
        bbar = torch.randn(n_blocks, generator=gen) * 0.1 if bias else None
    x = x.to(dtype).to(DEVICE)
    kbar = kbar.to(DEVICE)
    bbar = bbar.to(DEVICE) if bbar is not None else None
    return x, kbar, bbar


def _check_valid(idx, n_blocks, top_k):
    assert idx.dtype == torch.int32 and idx.shape[1] == top_k
    assert bool(((idx >= 0) & (idx < n_blocks)).all()), "index out of range"
    srt = idx.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "duplicate index in a row"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "d_ff,d_model,g",
    [pytest.param(80, 40, 16, id="g16-d40"), pytest.param(21, 37, 3, id="g3-d37"),
     pytest.param(12, 33, 1, id="g1-d33"), pytest.param(130, 70, 65, id="g65-d70")],
)
def test_block_means(dtype, bias, d_ff, d_model, g):
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(d_ff, d_model, generator=gen).to(dtype).to(DEVICE)
    key_bias = torch.randn(d_ff, generator=gen).to(dtype).to(DEVICE) if bias else None
    kbar, bbar = block_means(keys, key_bias, g)
    rk, rb = block_means_ref(keys, key_bias, g)
    assert kbar.dtype == torch.float32 and kbar.shape == (d_ff // g, d_model)
    assert_close(kbar, rk, atol=1e-5, rtol=1e-5, name="kbar")
    if bias:
        assert bbar.dtype == torch.float32
        assert_close(bbar, rb, atol=1e-5, rtol=1e-5, name="bbar")
    else:
        assert bbar is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize(
    "T,d,n_blocks,top_k",
    [
        pytest.param(37, 40, 50, 1, id="T37-d40-nb50-k1"),
        pytest.param(37, 40, 50, 3, id="T37-d40-nb50-k3"),
        pytest.param(64, 33, 45, 6, id="T64-d33-nb45-k6"),
        pytest.param(5, 96, 24, 24, id="T5-d96-nb24-kall"),
        pytest.param(100, 72, 130, 20, id="T100-d72-nb130-k20"),
        pytest.param(33, 128, 200, 64, id="T33-d128-nb200-k64"),
        pytest.param(1, 16, 7, 5, id="T1-d16-nb7-k5"),
    ],
)
def test_topk_exact(dtype, T, d, n_blocks, top_k):
    x, kbar, bbar = _inputs(T, d, n_blocks, dtype=dtype, seed=T + n_blocks)
    idx, scores = avgk_topk(x, kbar, bbar, top_k, return_scores=True)
    ref = select_blocks_ref(x, kbar, bbar, top_k)
    _check_valid(idx, n_blocks, top_k)
    assert torch.equal(idx.cpu(), ref.cpu()), f"indices differ in {(idx != ref).any(1).sum()} rows"
    ref_scores = block_scores_ref(x, kbar, bbar).gather(1, ref.long())
    assert_close(scores, ref_scores, atol=0, rtol=0, name="scores")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_topk_continuous(dtype, bias):
    """Random normal inputs: a valid top-K of the fp32 scores, equal to the reference except
    where two scores are closer than the dtype's score error."""
    T, d, n_blocks, top_k = 70, 96, 77, 7
    x, kbar, bbar = _inputs(T, d, n_blocks, dtype=dtype, bias=bias, seed=3, quantized=False)
    idx, scores = avgk_topk(x, kbar, bbar, top_k, return_scores=True)
    _check_valid(idx, n_blocks, top_k)
    full = block_scores_ref(x, kbar, bbar)
    top = full.topk(top_k + 1, dim=1).values
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    # Our picks' reference scores are the K best up to tol.
    assert_close(full.gather(1, idx.long()), top[:, :top_k], atol=tol, rtol=0, name="picked")
    assert_close(scores, full.gather(1, idx.long()), atol=tol, rtol=0, name="scores")
    clean = ((top[:, :-1] - top[:, 1:]).min(1).values > 2 * tol).cpu()
    assert clean.float().mean() > 0.5
    ref = select_blocks_ref(x, kbar, bbar, top_k)
    assert torch.equal(idx.cpu()[clean], ref.cpu()[clean])


def test_topk_ties_go_to_smaller_index():
    T, d, n_blocks = 9, 24, 40
    x, kbar, _ = _inputs(T, d, n_blocks, seed=5)
    kbar[:] = kbar[0]  # every block ties
    idx = avgk_topk(x, kbar, None, 11)
    assert torch.equal(idx.cpu(), torch.arange(11, dtype=torch.int32).expand(T, 11))
    # Duplicated best rows across chunks: 31 equals 3 and beats everything else.
    x, kbar, bbar = _inputs(T, d, n_blocks, seed=6)
    x = x.abs() + 0.25
    kbar = -kbar.abs()
    kbar[3] = 1.0
    kbar[31] = 1.0
    kbar[17] = 0.5
    kbar[38] = 0.5
    bbar = torch.zeros_like(bbar)
    idx = avgk_topk(x, kbar, bbar, 4)
    expect = torch.tensor([3, 31, 17, 38], dtype=torch.int32).expand(T, 4)
    assert torch.equal(idx.cpu(), expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_topk_nan_token(dtype):
    T, d, n_blocks, top_k = 40, 32, 37, 5
    x, kbar, bbar = _inputs(T, d, n_blocks, dtype=dtype, seed=8)
    x[3, 7] = float("nan")
    x[20, :] = float("nan")
    idx = avgk_topk(x, kbar, bbar, top_k)
    _check_valid(idx, n_blocks, top_k)
    ref = select_blocks_ref(x, kbar, bbar, top_k)
    ok = torch.ones(T, dtype=torch.bool)
    ok[[3, 20]] = False
    assert torch.equal(idx.cpu()[ok], ref.cpu()[ok])


def test_topk_nan_bias_row():
    """A NaN in bbar poisons one block for every token: indices stay valid and distinct."""
    x, kbar, bbar = _inputs(20, 16, 30, seed=9)
    bbar[4] = float("nan")
    idx = avgk_topk(x, kbar, bbar, 6)
    _check_valid(idx, 30, 6)


def test_topk_fp32_precision_follows_torch():
    """'highest' means true fp32 dots: equal to the fp32 reference on continuous inputs."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        x, kbar, bbar = _inputs(50, 128, 60, seed=10, quantized=False)
        _, scores = avgk_topk(x, kbar, bbar, 4, return_scores=True)
        ref = block_scores_ref(x, kbar, bbar).topk(4, dim=1).values
        assert_close(scores, ref, atol=1e-5, rtol=1e-5, name="scores")
    finally:
        torch.set_float32_matmul_precision(prev)


def test_topk_errors():
    """The op layer validates inputs (tests/test_validation.py); the launcher only asserts, and
    raises for its own limit, top_k past what it holds on chip (sfnn.ops scores those with
    torch)."""
    x, kbar, bbar = _inputs(4, 16, 10)
    with pytest.raises(AssertionError):
        avgk_topk(x, kbar, bbar, 11)
    with pytest.raises(AssertionError):
        avgk_topk(x, kbar.half(), bbar, 2)
    with pytest.raises(AssertionError):
        avgk_topk(x[:, :8].contiguous(), kbar, bbar, 2)
    big = _inputs(2, 16, MAX_TOP_K + 1)
    with pytest.raises(ValueError, match="top_k"):
        avgk_topk(*big, MAX_TOP_K + 1)


def test_topk_empty():
    x, kbar, bbar = _inputs(0, 16, 10)
    idx, scores = avgk_topk(x, kbar, bbar, 3, return_scores=True)
    assert idx.shape == (0, 3) and scores.shape == (0, 3)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_topk_large_cuda(dtype):
    """70,000 tokens (past int32-overflow-prone 65,536 rows), d_model 4096, 512 blocks."""
    T, d, n_blocks, top_k = 70_000, 4096, 512, 8
    x, kbar, bbar = _inputs(T, d, n_blocks, dtype=dtype, seed=11)
    idx = avgk_topk(x, kbar, bbar, top_k)
    ref = torch.cat([select_blocks_ref(x[i:i + 8192], kbar, bbar, top_k)
                     for i in range(0, T, 8192)])
    assert torch.equal(idx, ref), f"indices differ in {(idx != ref).any(1).sum()} rows"
    gen = torch.Generator().manual_seed(12)
    keys = torch.randn(n_blocks * 16, d, generator=gen).to(dtype).to(DEVICE)
    kbar2, _ = block_means(keys, None, 16)
    rk, _ = block_means_ref(keys, None, 16)
    assert_close(kbar2, rk, atol=1e-5, rtol=1e-5, name="kbar")


