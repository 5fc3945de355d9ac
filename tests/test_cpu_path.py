"""The torch backend's CPU implementations (sfnn/torch_path.py, sfnn/cpu_kernel.cpp).

- the few-token path (no CPU kernel, forward of at most FEW_TOKENS tokens) against the
  reference: every activation, bias on/off, gates on/off, T = 1..16, blocks shared by tokens and
  repeated within a row, groups of gathered blocks and single blocks used in place, NaN rows;
- the CPU kernel against the grouped pure-torch path, forward (y and the saved
  pre-activations) and backward (every gradient), through both its fused few-token loops and
  its ATen GEMMs, in fp32, fp64 and bf16; ``needs`` (only the asked-for gradients); repeatable
  bits; more than 65,536 tokens;
- dispatch: which implementation a call takes, and that the package works with the kernel off.
The kernel is built on first use (about a minute of CPU, then cached by torch).
"""
from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys

import pytest
import torch
from _cases import make_problem

import sfnn
from sfnn import cpu_kernel, torch_path
from sfnn.reference import block_ffn_ref
from sfnn.testing import TOLERANCES, assert_close

ACTIVATIONS = ("relu", "gelu", "silu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _indices(T, n_blocks, top_k, gen, *, repeats=False):
    """int32 (T, top_k); with ``repeats`` a row may name a block twice."""
    if repeats:
        return torch.randint(0, n_blocks, (T, top_k), generator=gen, dtype=torch.int32)
    return torch.stack([torch.randperm(n_blocks, generator=gen)[:top_k]
                        for _ in range(T)]).to(torch.int32)


def _ref(x, keys, values, indices, key_bias, out_bias, gates, g, activation):
    up = [None if t is None else t.detach().double() for t in (x, keys, values, key_bias,
                                                               out_bias, gates)]
    return block_ffn_ref(up[0], up[1], up[2], indices, block_size=g, key_bias=up[3],
                         out_bias=up[4], gates=up[5], activation=activation)


# ---------------------------------------------------------------------------------------------
# the few-token path


@pytest.mark.parametrize("T", range(1, 17))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_few_token_path_matches_the_reference(T, activation, bias):
    g, nb, k, d = 8, 12, 3, 24
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g, bias=bias)
    gen = _gen(T)
    # Tokens share blocks (12 blocks, 3 per token) and odd T repeat a block within a row.
    indices = _indices(T, nb, k, gen, repeats=T % 2 == 1)
    gates = torch.rand(T, k, generator=gen) if T % 3 == 0 else None
    y = torch_path.few_token_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                 block_size=g, activation=activation)
    assert y.dtype == x.dtype and y.shape == (T, d)
    assert_close(y, _ref(x, keys, values, indices, key_bias, out_bias, gates, g, activation),
                 name=f"y T={T}")


@pytest.mark.parametrize("group_bytes", [1, 3 * 2 * 8 * 24 * 4, 2**30],
                         ids=["one-block-in-place", "groups-of-3", "one-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_few_token_path_groups(monkeypatch, group_bytes, dtype):
    monkeypatch.setattr(torch_path, "FEW_TOKEN_GROUP_BYTES", group_bytes)
    monkeypatch.setattr(torch_path, "FEW_TOKEN_GATHER_BELOW", 2**30)
    g, nb, k, d, T = 8, 16, 5, 24, 6
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g, dtype=dtype)
    indices = _indices(T, nb, k, _gen(1))
    y = torch_path.few_token_fwd(x, keys, values, indices, key_bias, out_bias, None,
                                 block_size=g, activation="gelu")
    assert y.dtype == dtype
    monkeypatch.setattr(torch_path, "FEW_TOKEN_GATHER_BELOW", 1)  # every block in place
    y1 = torch_path.few_token_fwd(x, keys, values, indices, key_bias, out_bias, None,
                                  block_size=g, activation="gelu")
    assert_close(y1, y, name="in place vs gathered")
    assert_close(y, _ref(x, keys, values, indices, key_bias, out_bias, None, g, "gelu"),
                 name="y")


def test_few_token_path_keeps_nan_in_its_rows():
    """A NaN weight row in a block one token chose must not reach the other tokens (the path
    computes every gathered block for every token), and a NaN token stays in its row."""
    g, nb, d, T = 4, 6, 8, 3
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g)
    keys[2 * g + 1, 3] = float("nan")  # block 2
    x[2, 0] = float("nan")
    indices = torch.tensor([[2, 0], [1, 3], [4, 5]], dtype=torch.int32)
    y = torch_path.few_token_fwd(x, keys, values, indices, key_bias, out_bias, None,
                                 block_size=g, activation="relu")
    ref = _ref(x, keys, values, indices, key_bias, out_bias, None, g, "relu")
    assert bool(torch.isnan(y[0]).any()) and bool(torch.isnan(y[2]).all())
    assert bool(torch.isfinite(y[1]).all())
    assert_close(y, ref, name="y")


# ---------------------------------------------------------------------------------------------
# the CPU kernel


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernel.available():
        pytest.skip(f"the CPU kernel is not available here: {cpu_kernel.unavailable_reason()}")
    return cpu_kernel


KERNEL_CASES = [
    # T, d_model, n_blocks, g, top_k: many tokens per block (ATen GEMMs), a few (fused loops,
    # groups of 4 and a remainder), and unchosen blocks
    pytest.param(300, 40, 10, 16, 3, id="T300-d40-nb10-g16-k3-gemm"),
    pytest.param(7, 37, 6, 8, 2, id="T7-d37-nb6-g8-k2-fused"),
    pytest.param(1, 72, 40, 8, 5, id="T1-d72-nb40-g8-k5-decode"),
    pytest.param(24, 16, 20, 4, 4, id="T24-d16-nb20-g4-k4-mixed"),
]


def _kernel_problem(T, d, nb, g, k, dtype, bias, gated, seed):
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g, bias=bias, dtype=dtype)
    gen = _gen(seed)
    indices = _indices(T, nb, k, gen, repeats=seed % 2 == 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gates = torch.rand(T, k, generator=gen).to(acc) if gated else None
    return x, keys, values, indices, key_bias, out_bias, gates


@pytest.mark.parametrize("T, d, nb, g, k", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_matches_the_torch_path(kernel, T, d, nb, g, k, dtype, activation):
    for bias, gated in ((True, True), (False, False)):
        x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
            T, d, nb, g, k, dtype, bias, gated, seed=T + nb)
        kw = dict(block_size=g, activation=activation)
        y, saved = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                        save_for_backward=True, **kw)
        y_t, saved_t, _ = torch_path.grouped_block_ffn_fwd(
            x, keys, values, indices, key_bias, out_bias, gates, save_for_backward=True, **kw)
        atol, rtol = TOLERANCES[dtype]
        name = f"{activation} bias={bias} gates={gated}"
        assert y.dtype == dtype and saved.shape == saved_t.shape
        assert_close(y, y_t, atol=atol, rtol=rtol, name=f"y {name}")
        assert_close(saved, saved_t, atol=atol, rtol=rtol, name=f"saved {name}")
        assert_close(y, _ref(x, keys, values, indices, key_bias, out_bias, gates, g, activation),
                     atol=atol, rtol=rtol, name=f"y vs reference {name}")
        dy = torch.randn(T, d, generator=_gen(5)).to(dtype)
        needs = (True, True, True, bias, gated)  # as the op layer passes them
        got = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                   needs=needs, **kw)
        want = torch_path.grouped_block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates,
                                                saved_t, needs=needs, **kw)
        # without saved pre-activations the kernel recomputes them
        again = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates,
                                     x.new_empty(0), needs=needs, **kw)
        for gname, a, b, c in zip(("dx", "dkeys", "dvalues", "dkey_bias", "dgates"), got, want,
                                  again, strict=True):
            assert (a is None) == (b is None) == (c is None), gname
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, gname
                assert_close(a, b, atol=atol, rtol=rtol, name=f"{gname} {name}")
                assert_close(c, b, atol=atol, rtol=rtol, name=f"{gname} recomputed {name}")


def _gated_ref(x, keys, values, gate_keys, indices, key_bias, gate_bias, out_bias, gates, g,
               activation, dy):
    """y and the seven gradients (x, keys, values, key_bias, gates, gate_keys, gate_bias) of
    the gated block FFN, h = act(x kg^T + bg) * (x k^T + b), y = sum_slots gate * h v +
    out_bias, in float64 by autograd over the gathered blocks (PLAN.md's gated protocol)."""
    T, d = x.shape
    nb = keys.shape[0] // g
    leaves = [None if t is None else t.detach().double().requires_grad_(True)
              for t in (x, keys, values, key_bias, gates, gate_keys, gate_bias)]
    xs, ks, vs, kbs, gs, gks, gbs = leaves
    idx = indices.long()
    sel = (lambda t: t.view(nb, g, d)[idx])  # (T, top_k, g, d)
    a_g = torch.einsum("td,tkgd->tkg", xs, sel(gks))
    a_u = torch.einsum("td,tkgd->tkg", xs, sel(ks))
    if gbs is not None:
        a_g = a_g + gbs.view(nb, g)[idx]
    if kbs is not None:
        a_u = a_u + kbs.view(nb, g)[idx]
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[activation]
    h = act(a_g) * a_u
    if gs is not None:
        h = h * gs[..., None]
    y = torch.einsum("tkg,tkgd->td", h, sel(vs))
    if out_bias is not None:
        y = y + out_bias.double()
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.double())
    it = iter(grads)
    return y.detach(), [None if t is None else next(it) for t in leaves]


GATED_GRADS = ("dx", "dkeys", "dvalues", "dkey_bias", "dgates", "dgate_keys", "dgate_bias")


@pytest.mark.parametrize("T, d, nb, g, k", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_kernel_matches_the_reference(kernel, T, d, nb, g, k, dtype, activation):
    """The gated FFN (gate_keys/gate_bias): forward through the fused few-token loops and the
    ATen GEMMs, saved [A_gate | A_up] rows, all seven gradients, with and without biases and
    selection gates, with saved pre-activations and recomputing them."""
    for bias, gated in ((True, True), (False, False)):
        x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
            T, d, nb, g, k, dtype, bias, gated, seed=T + nb)
        gen = _gen(T * 3 + 1)
        gate_keys = (torch.randn(nb * g, d, generator=gen) * d ** -0.5).to(dtype)
        gate_bias = (torch.randn(nb * g, generator=gen) * 0.1).to(dtype) if bias else None
        kw = dict(block_size=g, activation=activation)
        gk = dict(gate_keys=gate_keys, gate_bias=gate_bias)
        y, saved = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                        save_for_backward=True, **kw, **gk)
        dy = torch.randn(T, d, generator=_gen(5)).to(dtype)
        y_ref, g_ref = _gated_ref(x, keys, values, gate_keys, indices, key_bias, gate_bias,
                                  out_bias, gates, g, activation, dy)
        atol, rtol = TOLERANCES[dtype]
        name = f"{activation} bias={bias} gates={gated}"
        assert y.dtype == dtype and saved.shape == (T * k, 2 * g)
        assert_close(y, y_ref, atol=atol, rtol=rtol, name=f"y {name}")
        # saved rows are in block order (the stable sort of the flat indices)
        order = torch.argsort(indices.reshape(-1).long(), stable=True)
        tok, blk = order // k, indices.reshape(-1).long()[order]
        rows = blk[:, None] * g + torch.arange(g)
        a_g = (x.double()[tok, None, :] * gate_keys.double()[rows]).sum(-1)
        a_u = (x.double()[tok, None, :] * keys.double()[rows]).sum(-1)
        if bias:
            a_g, a_u = a_g + gate_bias.double()[rows], a_u + key_bias.double()[rows]
        assert_close(saved, torch.cat([a_g, a_u], 1), atol=atol, rtol=rtol, name=f"saved {name}")
        # the pure-torch gated path gives the same
        y_t, saved_t, _ = torch_path.gated_block_ffn_fwd(
            x, keys, values, indices, key_bias, out_bias, gates, save_for_backward=True, **kw,
            **gk)
        assert_close(y, y_t, atol=atol, rtol=rtol, name=f"y vs torch path {name}")
        assert_close(saved, saved_t, atol=atol, rtol=rtol, name=f"saved vs torch path {name}")
        needs = (True, True, True, bias, gated, True, bias)
        want_t = torch_path.gated_block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates,
                                                saved_t, needs=needs, **kw, **gk)
        for sv in (saved, x.new_empty(0)):
            got = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, sv,
                                       needs=needs, **kw, **gk)
            assert len(got) == 7
            for gname, a, b, c in zip(GATED_GRADS, got, g_ref, want_t, strict=True):
                assert (c is None) == (b is None), gname
                if c is not None and dtype != torch.bfloat16:
                    assert_close(a, c, atol=atol, rtol=rtol, name=f"{gname} vs torch path")
                assert (a is None) == (b is None), gname
                if a is not None:
                    assert a.shape == b.shape and (gname == "dgates" or a.dtype == dtype), gname
                    # bf16 gradients summed over many pairs: relative to their scale
                    tol = atol * max(1.0, float(b.abs().max())) if dtype == torch.bfloat16 \
                        else atol
                    assert_close(a, b, atol=tol, rtol=rtol,
                                 name=f"{gname} {name} saved={bool(sv.numel())}")


def test_gated_kernel_needs_and_errors(kernel):
    """Every subset of the seven gradients of a gated call gives the full backward's bits for
    the asked ones and None for the others; five flags give the plain five; gate_bias without
    gate_keys and a mis-shaped gate table are errors."""
    T, d, nb, g, k = 60, 24, 8, 8, 3
    x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
        T, d, nb, g, k, torch.float32, True, True, seed=3)
    gk = dict(gate_keys=keys.flip(0).contiguous(), gate_bias=key_bias.flip(0).contiguous())
    kw = dict(block_size=g, activation="silu")
    _, saved = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                    save_for_backward=True, **kw, **gk)
    dy = torch.randn(T, d, generator=_gen(2))
    full = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                needs=(True,) * 7, **kw, **gk)
    for needs in itertools.product((False, True), repeat=7):
        got = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                   needs=needs, **kw, **gk)
        for need, a, b in zip(needs, got, full, strict=True):
            assert torch.equal(a, b) if need else a is None, needs
    assert len(kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                    needs=(True,) * 5, **kw, **gk)) == 5
    with pytest.raises(RuntimeError, match="gate_bias without gate_keys"):
        kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                             save_for_backward=False, gate_bias=key_bias, **kw)
    with pytest.raises(RuntimeError, match="gate_keys must be"):
        kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                             save_for_backward=False, gate_keys=keys[:, :-1].contiguous(), **kw)
    with pytest.raises(ValueError, match="5 or 7 flags"):
        kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                             needs=(True,) * 6, **kw, **gk)


def test_kernel_needs_skips_what_is_not_asked(kernel):
    """Every subset of the five gradients: the others are None, the asked ones are the bits of
    the full backward."""
    T, d, nb, g, k = 60, 24, 8, 8, 3
    x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
        T, d, nb, g, k, torch.float32, True, True, seed=3)
    kw = dict(block_size=g, activation="silu")
    _, saved = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                    save_for_backward=True, **kw)
    dy = torch.randn(T, d, generator=_gen(2))
    full = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                needs=(True,) * 5, **kw)
    for needs in itertools.product((False, True), repeat=5):
        got = kernel.block_ffn_bwd(dy, x, keys, values, indices, key_bias, gates, saved,
                                   needs=needs, **kw)
        for need, a, b in zip(needs, got, full, strict=True):
            if need:
                assert torch.equal(a, b), needs
            else:
                assert a is None, needs
    # absent inputs have no gradient even when asked
    got = kernel.block_ffn_bwd(dy, x, keys, values, indices, None, None, x.new_empty(0),
                               needs=(True,) * 5, **kw)
    assert got[3] is None and got[4] is None and got[0] is not None


def test_kernel_repeats_its_bits_while_threads_claim_tasks_as_they_come(kernel):
    """Two threads claim the tasks in whatever order they get to them, yet every output of the
    forward and the backward (gates, dx from the tasks' accumulators) is bitwise the same on
    every run: a task's blocks and accumulator do not depend on the thread that ran it."""
    T, d, nb, g, k = 300, 24, 12, 8, 3
    x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
        T, d, nb, g, k, torch.float32, True, True, seed=6)
    kw = dict(block_size=g, activation="gelu")
    threads = torch.get_num_threads()
    runs = []
    try:
        torch.set_num_threads(2)
        for _ in range(4):
            y, saved = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates,
                                            save_for_backward=True, **kw)
            grads = kernel.block_ffn_bwd(x, x, keys, values, indices, key_bias, gates, saved,
                                         needs=(True,) * 5, **kw)
            runs.append((y, saved, *grads))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert torch.equal(a, b)


def test_kernel_is_repeatable_and_close_across_thread_counts(kernel):
    T, d, nb, g, k = 200, 32, 16, 8, 4
    x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
        T, d, nb, g, k, torch.float32, True, False, seed=9)
    kw = dict(block_size=g, activation="gelu", save_for_backward=False)
    y1, _ = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates, **kw)
    y2, _ = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates, **kw)
    assert torch.equal(y1, y2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y3, _ = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, gates, **kw)
    finally:
        torch.set_num_threads(threads)
    assert_close(y3, y1, name="y with 1 thread")


def test_kernel_regions_run_on_torchs_threads(kernel):
    """The kernel's parallel regions use torch's threads: a build without OpenMP would run ATen's
    inline parallel_for serially, one thread of two, and lose to the pure-PyTorch path."""
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            assert kernel.region_threads() == n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernel_shares_torchs_openmp_runtime(kernel):
    """One OpenMP runtime in a process that loads torch and the kernel, torch's: a second
    libgomp would bring its own thread pool, and the kernel's regions would compete with
    torch's for the cores. (A fresh process: other packages, scikit-learn for one, bring their
    own libgomp.)"""
    code = ("import torch\nfrom sfnn import cpu_kernel\nassert cpu_kernel.available()\n"
            "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    runtimes = ast.literal_eval(out.stdout)
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_kernel_on_two_threads_under_autograd(kernel, gated):
    """Parameters that require grad, through the op layer, on two threads: the worker threads
    run below autograd as the calling thread does (their dispatch state is their own), and every
    gradient matches the reference."""
    T, d, nb, g, k = 256, 24, 8, 8, 3  # ~96 pairs per block: the ATen GEMM path, 2 tasks
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g)
    gate_keys = torch.randn(nb * g, d, generator=_gen(3)) / d ** 0.5 if gated else None
    leaves = [t.detach().requires_grad_(True) for t in (x, keys, values, key_bias, out_bias)]
    extra = {}
    if gated:
        extra["gate_keys"] = gate_keys.detach().requires_grad_(True)
        leaves.append(extra["gate_keys"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = sfnn.sparse_ffn(leaves[0], leaves[1], leaves[2], block_size=g, top_k=k,
                            key_bias=leaves[3], out_bias=leaves[4], activation="gelu",
                            backend="torch", deterministic=True, **extra)
        dy = torch.randn(y.shape, generator=_gen(4))
        grads = torch.autograd.grad(y, leaves, dy)
    finally:
        torch.set_num_threads(threads)
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_extra = {"gate_keys": ref[5]} if gated else {}
    y_ref = sfnn.sparse_ffn(ref[0], ref[1], ref[2], block_size=g, top_k=k, key_bias=ref[3],
                            out_bias=ref[4], activation="gelu", backend="reference",
                            **ref_extra)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.double())
    assert_close(y, y_ref, name="y")
    for name, got, want in zip(("x", "keys", "values", "key_bias", "out_bias", "gate_keys"),
                               grads, grads_ref, strict=False):
        assert_close(got, want, name=f"d{name}")


ONE_REGION = """
import resource, torch
from sfnn import cpu_kernel
torch.set_num_threads(2)
T, d, nb, g, k = 2048, 64, 128, 16, 4  # ~64 pairs per block: the ATen GEMM path
gen = torch.Generator().manual_seed(0)
x, keys = torch.randn(T, d, generator=gen), torch.randn(nb * g, d, generator=gen)
idx = torch.randint(0, nb, (T, k), generator=gen, dtype=torch.int32)
kw = dict(block_size=g, activation="gelu")
_, saved = cpu_kernel.block_ffn_fwd(x, keys, keys, idx, None, None, None,
                                    save_for_backward=True, **kw)
before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
cpu_kernel.block_ffn_fwd(x, keys, keys, idx, None, None, None, save_for_backward=True, **kw)
cpu_kernel.block_ffn_bwd(x, x, keys, keys, idx, None, None, saved, needs=[True] * 3 + [False] * 2,
                         **kw)
print(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before, torch.get_num_threads())
"""


def test_kernel_runs_one_region_and_leaves_the_thread_settings(kernel):
    """Inside the kernel's region the GEMMs run on the calling thread: no nested OpenMP/MKL team
    per block. With OMP_WAIT_POLICY=PASSIVE every fork/join puts threads to sleep (a voluntary
    context switch); a nested team per GEMM made ~9 per block, one region per call a handful.
    torch's thread count is the same after the calls."""
    pytest.importorskip("resource")
    out = subprocess.run([sys.executable, "-c", ONE_REGION], capture_output=True, text=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 0, out.stderr
    switches, threads = (int(v) for v in out.stdout.split())
    assert switches < 32, f"{switches} voluntary context switches for 2 calls over 128 blocks"
    assert threads == 2


def test_kernel_past_65536_tokens(kernel):
    """int64 offsets: 70,000 tokens (x rows and pair ids past 2^16)."""
    T, d, nb, g, k = 70_000, 4, 8, 2, 2
    x, keys, values, indices, key_bias, out_bias, gates = _kernel_problem(
        T, d, nb, g, k, torch.float32, True, False, seed=1)
    y, _ = kernel.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                                block_size=g, activation="relu", save_for_backward=False)
    y_t, _, _ = torch_path.grouped_block_ffn_fwd(x, keys, values, indices, key_bias, out_bias,
                                                 None, block_size=g, activation="relu",
                                                 save_for_backward=False)
    assert_close(y, y_t, name="y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("T, d, nb, k", [(1, 64, 128, 16), (16, 64, 4100, 8), (700, 24, 9, 4),
                                         (33, 40, 520, 64)],
                         ids=["T1-nb128-k16", "T16-nb4100-k8-blocks-split", "T700-nb9-k4-chunks",
                              "T33-nb520-k64"])
def test_kernel_selects_as_the_torch_path(kernel, monkeypatch, T, d, nb, k, dtype):
    """The kernel's one-region selection gives the torch path's indices: exactly on exact
    (integer) scores with many ties and on rows of NaN or inf, and the same top scores, best
    first, on random data (the score GEMMs may round differently). Up to 16 tokens the scores
    are split over blocks (across threads once kbar passes 512 KiB per thread: nb 4100 at d
    64), more tokens split over tokens."""
    gen = _gen(T + nb)
    xi = torch.randint(-2, 3, (T, d), generator=gen).to(dtype)
    ki = torch.randint(-2, 3, (nb, d), generator=gen).float()
    bi = torch.randint(-2, 3, (nb,), generator=gen).float()
    xi[0, 0] = float("nan")
    if T > 1:
        xi[1] = float("inf")
    got = torch_path.select_blocks(xi, ki, bi, k)
    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: None)
    want = torch_path.select_blocks(xi, ki, bi, k)
    assert torch.equal(got, want)
    x = torch.randn(T, d, generator=gen).to(dtype)
    kbar = torch.randn(nb, d, generator=gen) / d ** 0.5
    want = torch_path.select_blocks(x, kbar, None, k)
    monkeypatch.undo()
    got = kernel.select_blocks(x, kbar, None, k)
    s = x.float() @ kbar.t()
    got_s, want_s = s.gather(1, got.long()), s.gather(1, want.long())
    assert_close(got_s, want_s, atol=1e-5, rtol=1e-5, name="selected scores")
    assert bool((got_s[:, 1:] <= got_s[:, :-1] + 1e-5).all())


@pytest.mark.parametrize("T", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_fused_avgk_step_is_selection_then_ffn(kernel, T, dtype, activation, bias, gated):
    """``avgk_ffn_fwd`` (inference's one call) gives select_blocks' indices and block_ffn_fwd's
    y over them bit for bit, and the reference's y: few tokens (the fused loops) and more (the
    GEMMs), blocks shared across tokens (10 blocks, 4 per token)."""
    g, nb, k, d = 8, 10, 4, 24
    x, keys, values, key_bias, out_bias = make_problem(T, d, nb * g, bias=bias, dtype=dtype)
    gate_keys = gate_bias = None
    if gated:
        gate_keys = make_problem(1, d, nb * g, dtype=dtype)[1]
        gate_bias = torch.randn(nb * g, generator=_gen(T)).to(dtype) if bias else None
    scored = (gate_keys, gate_bias) if gated else (keys, key_bias)
    kbar, bbar = torch_path.block_means(*scored, g)
    kw = dict(block_size=g, activation=activation, gate_keys=gate_keys, gate_bias=gate_bias)
    y, idx = kernel.avgk_ffn_fwd(x, kbar, bbar, keys, values, key_bias, out_bias, top_k=k, **kw)
    want_idx = kernel.select_blocks(x, kbar, bbar, k)
    want_y, _ = kernel.block_ffn_fwd(x, keys, values, want_idx, key_bias, out_bias, None,
                                     save_for_backward=False, **kw)
    assert idx.dtype == torch.int32 and torch.equal(idx, want_idx)
    assert y.dtype == dtype and torch.equal(y, want_y)
    assert T == 1 or idx.unique().numel() < idx.numel()  # tokens share blocks
    ref = sfnn.reference.sparse_ffn_ref(
        *(None if t is None else t.double() for t in (x, keys, values)), block_size=g,
        top_k=k, key_bias=None if key_bias is None else key_bias.double(),
        out_bias=None if out_bias is None else out_bias.double(), activation=activation,
        gate_keys=None if gate_keys is None else gate_keys.double(),
        gate_bias=None if gate_bias is None else gate_bias.double())
    # the float64 reference may rank near-tied blocks differently: compare where it agrees
    same = (sfnn.reference.select_blocks_ref(x.double(), *(
        None if t is None else t.double() for t in (kbar, bbar)), k).sort(1).values
        == idx.long().sort(1).values).all(1)
    assert same.float().mean() > 0.5
    assert_close(y[same], ref[same], name=f"y T={T}")


def test_kernel_rejects_bad_indices(kernel):
    x, keys, values, _, _ = make_problem(2, 8, 16, bias=False)
    bad = torch.tensor([[0, 4], [1, 2]], dtype=torch.int32)  # 4 blocks of 4
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        kernel.block_ffn_fwd(x, keys, values, bad, None, None, None, block_size=4,
                             activation="relu", save_for_backward=False)


# ---------------------------------------------------------------------------------------------
# dispatch and availability


def test_torch_backend_dispatch(monkeypatch):
    """The kernel serves every CPU call when available; without it a short no-grad forward
    takes the few-token path and everything else the grouped loop."""
    x, keys, values, key_bias, out_bias = make_problem(3, 16, 32)
    indices = _indices(3, 4, 2, _gen(0))
    calls = []
    monkeypatch.setattr(torch_path, "few_token_fwd",
                        lambda *a, **k: calls.append("few") or torch.zeros(3, 16))
    monkeypatch.setattr(torch_path, "grouped_block_ffn_fwd",
                        lambda *a, **k: calls.append("grouped") or (None, None, None))
    kw = dict(block_size=8, activation="relu", deterministic=False)
    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: None)
    torch_path.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                             save_for_backward=False, **kw)
    torch_path.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                             save_for_backward=True, **kw)
    big = make_problem(torch_path.FEW_TOKENS + 1, 16, 32)[0]
    torch_path.block_ffn_fwd(big, keys, values, _indices(big.shape[0], 4, 2, _gen(1)), None,
                             None, None, save_for_backward=False, **kw)
    assert calls == ["few", "grouped", "grouped"]

    class Spy:
        @staticmethod
        def block_ffn_fwd(*a, **k):
            calls.append("kernel")
            return torch.zeros(3, 16), torch.empty(0)

    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: Spy)
    torch_path.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                             save_for_backward=False, **kw)
    assert calls[-1] == "kernel"
    # gated calls take the kernel's gated variant when it is there, else the gated loop
    seen = {}

    class GatedSpy:
        @staticmethod
        def block_ffn_fwd(*a, **k):
            seen["fwd"] = k["gate_keys"] is keys
            return torch.zeros(3, 16), torch.empty(0)

        @staticmethod
        def block_ffn_bwd(*a, **k):
            seen["bwd"] = (k["gate_keys"] is keys, len(k["needs"]))
            return (None,) * 7

    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: GatedSpy)
    torch_path.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                             save_for_backward=True, gate_keys=keys, **kw)
    torch_path.block_ffn_bwd(x, x, keys, values, indices, key_bias, None, x.new_empty(0), None,
                             needs=(True,) * 7, gate_keys=keys, **kw)
    assert seen == {"fwd": True, "bwd": (True, 7)}
    monkeypatch.setattr(torch_path, "_cpu_kernel", lambda t: None)
    monkeypatch.setattr(torch_path, "gated_block_ffn_fwd",
                        lambda *a, **k: calls.append("gated") or (None, None, None))
    torch_path.block_ffn_fwd(x, keys, values, indices, key_bias, out_bias, None,
                             save_for_backward=False, gate_keys=keys, **kw)
    assert calls[-1] == "gated"


AVAILABILITY = """
import os, sys, warnings
import torch, sfnn, sfnn.cpu_kernel as ck
from sfnn.reference import sparse_ffn_ref
print(ck.available(), "|", ck.unavailable_reason())
x, k, v = torch.randn(2, 8), torch.randn(32, 8), torch.randn(32, 8)
y = sfnn.sparse_ffn(x, k, v, block_size=4, top_k=2, backend="torch")
assert torch.allclose(y, sparse_ffn_ref(x, k, v, block_size=4, top_k=2), atol=1e-5)
"""


@pytest.mark.parametrize("env, expect", [
    ({"SFNN_CPU_KERNEL": "0"}, "SFNN_CPU_KERNEL=0 turned the CPU kernel off"),
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
], ids=["off", "no-compiler"])
def test_without_the_kernel_the_torch_path_still_runs(env, expect):
    out = subprocess.run([sys.executable, "-c", AVAILABILITY], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False |") and expect in out.stdout, out.stdout


def test_forced_kernel_says_why_it_is_missing():
    code = "import sfnn.cpu_kernel as ck\ntry:\n ck.available()\nexcept RuntimeError as e:\n" \
           " print('raised:', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "SFNN_CPU_KERNEL": "1", "CXX": "/nonexistent/c++"})
    assert "raised: SFNN_CPU_KERNEL=1 but no C++ compiler" in out.stdout, out.stdout + out.stderr
