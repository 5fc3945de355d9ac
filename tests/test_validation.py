"""Bad input raises a clear ValueError/TypeError naming the argument; backends explain refusals."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from _cases import make_problem

import sfnn


@pytest.fixture
def problem():
    return make_problem(10, 16, 64)


def _call(x, keys, values, kb=None, ob=None, **kw):
    kw.setdefault("block_size", 16)
    kw.setdefault("top_k", 2)
    return sfnn.sparse_ffn(x, keys, values, key_bias=kb, out_bias=ob, **kw)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(block_size=24), ValueError, "block_size=24 must divide d_ff=64"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=-16), ValueError, "block_size"),
    (dict(block_size=16.0), TypeError, "block_size must be an int"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=5), ValueError, "top_k=5 must be <= n_blocks"),
    (dict(top_k=True), TypeError, "top_k must be an int"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(backend="cublas"), ValueError, "backend must be one of"),
])
def test_bad_configuration(problem, kw, exc, match):
    x, keys, values, kb, ob = problem
    with pytest.raises(exc, match=match):
        _call(x, keys, values, kb, ob, **kw)


def test_bad_shapes(problem):
    x, keys, values, kb, ob = problem
    with pytest.raises(ValueError, match="x must be .* d_model=16"):
        _call(torch.randn(10, 15), keys, values)
    with pytest.raises(ValueError, match="keys and values"):
        _call(x, keys, values[:, :8])
    with pytest.raises(ValueError, match="keys must be 2-D"):
        _call(x, keys[None], values)
    with pytest.raises(ValueError, match="key_bias must be"):
        _call(x, keys, values, kb[:10])
    with pytest.raises(ValueError, match="out_bias must be"):
        _call(x, keys, values, kb, torch.randn(17))
    with pytest.raises(ValueError, match="x must be"):
        _call(torch.tensor(1.0), keys, values)


def test_bad_dtypes(problem):
    x, keys, values, kb, ob = problem
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        _call(x.long(), keys, values)
    with pytest.raises(TypeError, match="keys must be a floating tensor"):
        _call(x, keys.int(), values)
    with pytest.raises(TypeError, match="share one dtype"):
        _call(x.double(), keys, values)
    with pytest.raises(TypeError, match="share one dtype"):
        _call(x, keys, values, kb.half(), ob)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _call(x.tolist(), keys, values)


def test_mixed_devices(problem):
    x, keys, values, kb, ob = problem
    with pytest.raises(ValueError, match="one device"):
        _call(x.to("meta"), keys, values)


def test_block_ffn_bad_indices_and_gates(problem):
    x, keys, values, kb, ob = problem
    idx = torch.zeros(10, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        sfnn.block_ffn(x, keys, values, idx.float(), block_size=16)
    with pytest.raises(ValueError, match="indices must be"):
        sfnn.block_ffn(x, keys, values, idx[:9], block_size=16)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_blocks=4\)"):
        sfnn.block_ffn(x, keys, values, idx + 4, block_size=16)
    with pytest.raises(ValueError, match=r"indices must lie in"):
        sfnn.block_ffn(x, keys, values, idx - 1, block_size=16)
    with pytest.raises(ValueError, match="gates must have indices' shape"):
        sfnn.block_ffn(x, keys, values, idx, block_size=16, gates=torch.ones(10, 3))
    with pytest.raises(TypeError, match="gates must be a floating tensor"):
        sfnn.block_ffn(x, keys, values, idx, block_size=16, gates=torch.ones(10, 2).long())


def test_select_blocks_bad_input():
    x, kbar = torch.randn(5, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="top_k=7 must be <= n_blocks=6"):
        sfnn.select_blocks(x, kbar, None, 7)
    with pytest.raises(ValueError, match="bbar must be"):
        sfnn.select_blocks(x, kbar, torch.randn(5), 2)
    with pytest.raises(ValueError, match="x must be"):
        sfnn.select_blocks(torch.randn(5, 7), kbar, None, 2)


def test_module_bad_configuration():
    with pytest.raises(ValueError, match="must divide"):
        sfnn.SparseFFN(16, 60, block_size=16)
    with pytest.raises(ValueError, match="top_k=9 must be <= n_blocks"):
        sfnn.SparseFFN(16, 64, block_size=8, top_k=9)
    with pytest.raises(ValueError, match="activation"):
        sfnn.SparseFFN(16, 64, block_size=8, activation="elu")
    with pytest.raises(ValueError, match="backend"):
        sfnn.SparseFFN(16, 64, block_size=8, backend="gpu")


def test_triton_backend_on_cpu_explains(problem, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if importlib.util.find_spec("triton") is not None:  # the flag is read when kernels load
        from sfnn.triton_kernels import _common
        monkeypatch.setattr(_common, "INTERPRET", False)
    x, keys, values, kb, ob = problem
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _call(x, keys, values, backend="triton")


def test_cuda_backend_without_gpu_or_extension_explains(problem):
    x, keys, values, kb, ob = problem
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        _call(x, keys, values, backend="cuda")


def test_auto_uses_torch_on_cpu(problem, monkeypatch):
    from sfnn import ops
    assert ops.resolve_backend("auto", torch.device("cpu"), 10, True) == "torch"


def test_bad_means_cache(problem):
    x, keys, values, kb, ob = problem
    with pytest.raises(TypeError, match="means_cache must be a sfnn.BlockMeansCache or None"):
        _call(x, keys, values, means_cache={})
    with pytest.raises(TypeError, match="means_cache must be"):
        sfnn.block_means(keys, kb, block_size=16, means_cache="cache")
