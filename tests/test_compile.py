"""torch.library registration: opcheck on every op, torch.compile(fullgraph=True) end to end."""
from __future__ import annotations

import pytest
import torch
from _cases import backend_device, make_problem

import sfnn
from sfnn import ops
from sfnn.reference import sparse_ffn_ref
from sfnn.testing import assert_close


def _backends():
    return ["torch"] + (["triton"] if ops.triton_import_error() is None else [])


@pytest.mark.parametrize("backend", _backends())
def test_opcheck_registered_ops(backend):
    dev = backend_device(backend)
    x, keys, values, kb, ob = make_problem(12, 16, 64, device=dev)
    kbar, bbar = ops.block_means_op(keys, kb, 16, backend)
    torch.library.opcheck(ops.block_means_op, (keys, kb, 16, backend))
    torch.library.opcheck(ops.block_means_op, (keys, None, 16, backend))
    torch.library.opcheck(ops.block_means_op, (keys, kb.repeat_interleave(2)[::2], 16, backend))
    torch.library.opcheck(ops.select_blocks_op, (x, kbar, bbar, 3, backend))
    torch.library.opcheck(ops.select_blocks_op, (x, kbar, bbar.repeat_interleave(2)[1::2], 3,
                                                 backend))
    if backend == "torch":  # float64 means (only the torch path takes float64)
        torch.library.opcheck(ops.block_means_op, (keys.double(), kb.double(), 16, backend))
    idx = ops.select_blocks_op(x, kbar, bbar, 3, backend)
    gates = torch.rand(12, 3, device=dev)
    for gate in (None, gates):
        args = (x, keys, values, idx, kb, ob, gate, 16, "gelu", backend, False, True)
        torch.library.opcheck(ops.block_ffn_op, args)
    xg = x.clone().requires_grad_()
    args = (xg, keys.clone().requires_grad_(), values, idx, kb, ob, gates.clone().requires_grad_(),
            16, "silu", backend, False, True)
    torch.library.opcheck(ops.block_ffn_op, args)
    y, saved, route = ops.block_ffn_op(x, keys, values, idx, kb, ob, gates, 16, "relu", backend,
                                       False, True)
    for needs in ([True] * 7, [True, False, True, False, True, False, False],
                  [False, True, False, True, False, False, False]):
        torch.library.opcheck(ops.block_ffn_backward_op,
                              (torch.randn_like(y), x, keys, values, idx, kb, gates, saved, route,
                               16, "relu", backend, False, needs))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_compile_fullgraph_forward_and_backward(gated):
    torch._dynamo.reset()
    act = "silu" if gated else "gelu"
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=2, activation=act, backend="torch",
                         gated=gated)
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 16, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref = sparse_ffn_ref(ref_x, ffn.key_weight, ffn.value_weight, block_size=16, top_k=2,
                         key_bias=ffn.key_bias, out_bias=ffn.out_bias, activation=act,
                         gate_keys=ffn.gate_weight, gate_bias=ffn.gate_bias)
    ref.sum().backward()
    assert_close(y, ref, name="y")
    assert_close(x.grad, ref_x.grad, name="dx")
    if gated:
        assert ffn.gate_weight.grad is not None and ffn.gate_bias.grad is not None
    # a new token count reuses the graph (dynamic shapes) or recompiles, never breaks
    compiled(torch.randn(5, 16)).sum().backward()


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    ffn = sfnn.SparseFFN(16, 48, block_size=8, top_k=3, backend="torch")
    compiled = torch.compile(ffn, fullgraph=True)
    x = torch.randn(11, 16, requires_grad=True)
    y = compiled(x)
    y.pow(2).sum().backward()
    assert_close(y, ffn(x.detach()), name="y")
    assert ffn.key_weight.grad is not None and x.grad is not None


def test_compiled_eval_layer_recomputes_means_each_call():
    """Under torch.compile the cache steps aside (its host-side check would be traced once): a
    compiled eval-mode layer sees even a .data write, which bypasses the version counter."""
    torch._dynamo.reset()
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=1, backend="torch").eval()
    compiled = torch.compile(ffn, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 16).abs() + 0.1
    with torch.no_grad():
        compiled(x)
        assert not ffn.means_cache.filled
        ffn.key_weight.data[48:64] = 0.0
        ffn.key_weight.data[48:64, 0] = 100.0  # block 3 now wins for every token
        y = compiled(x)
    ref = sparse_ffn_ref(x, ffn.key_weight, ffn.value_weight, block_size=16, top_k=1,
                         key_bias=ffn.key_bias, out_bias=ffn.out_bias)
    assert_close(y, ref, name="y after an unseen write")
    assert not ffn.means_cache.filled
