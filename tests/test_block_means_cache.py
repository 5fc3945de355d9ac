"""Block means are never stale where the user did nothing unusual (issue 16).

Each test compares the layer with the dense-masked reference on the *current* weights after
something changed them, and checks that the change really moved the selection, so that a stale
cache cannot pass.
"""
from __future__ import annotations

import copy
import os
import pickle
import socket

import pytest
import torch
from torch import nn

import sfnn
from sfnn import cache as cache_mod
from sfnn.reference import select_blocks_ref, sparse_ffn_ref
from sfnn.testing import assert_close

D_MODEL, D_FF, G, K = 32, 256, 16, 4


def _ref(ffn: sfnn.SparseFFN, x: torch.Tensor) -> torch.Tensor:
    return sparse_ffn_ref(x, ffn.key_weight.detach(), ffn.value_weight.detach(),
                          block_size=ffn.block_size, top_k=ffn.top_k,
                          key_bias=None if ffn.key_bias is None else ffn.key_bias.detach(),
                          out_bias=None if ffn.out_bias is None else ffn.out_bias.detach(),
                          activation=ffn.activation)


def _selection(ffn: sfnn.SparseFFN, x: torch.Tensor) -> torch.Tensor:
    kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=ffn.block_size,
                                  backend="reference")
    return select_blocks_ref(x, kbar, bbar, ffn.top_k)


def _check_current(ffn: sfnn.SparseFFN, x: torch.Tensor, name: str) -> None:
    with torch.no_grad():
        assert_close(ffn(x), _ref(ffn, x), name=name)


@pytest.fixture
def x():
    return torch.randn(64, D_MODEL)


@pytest.fixture
def count_computes(monkeypatch):
    """One element per cache fill (means computed and kept) of any BlockMeansCache."""
    fills = []

    class CountingEntry(cache_mod._Entry):
        __slots__ = ()

        def __init__(self, *args):
            fills.append(1)
            super().__init__(*args)

    monkeypatch.setattr(cache_mod, "_Entry", CountingEntry)
    return fills


OPTIMIZERS = [
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False), id="adamw-forloop"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True), id="adamw-foreach"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True), id="adamw-fused"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=2.0, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=2.0, momentum=0.9, fused=True),
                 id="sgd-fused"),
    pytest.param(lambda p: torch.optim.Adagrad(p, lr=0.3, fused=True), id="adagrad-fused"),
]


@pytest.mark.parametrize("make_opt", OPTIMIZERS)
@pytest.mark.parametrize("eval_between", [False, True], ids=["train-mode", "eval-between"])
def test_training_steps_select_with_current_keys(x, make_opt, eval_between):
    """After every step the forward (and a no_grad evaluation, in eval mode or not) selects
    with the keys the optimizer just wrote, fused optimizers included."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)
    opt = make_opt(ffn.parameters())
    first = _selection(ffn, x)
    moved = False
    for step in range(4):
        if eval_between:  # an evaluation between steps fills the eval-mode cache
            ffn.eval()
            _check_current(ffn, x, f"eval before step {step}")
            ffn.train()
        opt.zero_grad()
        ffn(x).square().mean().backward()
        opt.step()
        _check_current(ffn, x, f"train-mode no_grad after step {step}")
        y = ffn(x)
        assert_close(y, _ref(ffn, x), name=f"forward after step {step}")
        moved = moved or not torch.equal(_selection(ffn, x), first)
    assert moved, "the steps never changed the selection: the test would not see stale means"


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_eval_mode_fine_tuning_sees_every_step(x, fused, count_computes):
    """A layer kept in eval mode (dropout-free fine-tuning) with no_grad evaluations between
    fused steps: only the optimizer step hook can tell the cache the keys changed."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    opt = torch.optim.AdamW(ffn.parameters(), lr=0.1, fused=fused, foreach=not fused)
    first = _selection(ffn, x)
    for step in range(4):
        _check_current(ffn, x, f"eval before step {step}")
        _check_current(ffn, x, f"eval again before step {step}")
        opt.zero_grad()
        ffn(x).square().mean().backward()
        opt.step()
    _check_current(ffn, x, "eval after the last step")
    assert not torch.equal(_selection(ffn, x), first)
    assert len(count_computes) == 5  # one per generation: the second evaluation was a hit


def test_eval_cache_hits_and_sees_in_place_updates(x, count_computes):
    ffn = sfnn.SparseFFN(16, 64, block_size=16, top_k=1).eval()
    xp = torch.randn(8, 16).abs() + 0.1  # positive first feature
    with torch.no_grad():
        before = ffn(xp)
        assert torch.equal(ffn(xp), before) and len(count_computes) == 1
        ffn.key_weight[48:64] = 0.0  # in place: the version counter moves
        ffn.key_weight[48:64, 0] = 100.0  # block 3 now wins for every token
        after = ffn(xp)
    assert len(count_computes) == 2
    assert_close(after, _ref(ffn, xp))
    assert _selection(ffn, xp).flatten().tolist() == [3] * 8


def test_train_mode_never_caches(x, count_computes):
    """Training mode recomputes the means on every call, even under no_grad: writes that
    bypass the version counter (numpy alias, .data, collectives) are always seen there."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)
    with torch.no_grad():
        ffn(x)
    ffn.key_weight.detach().numpy()[:] = torch.randn(D_FF, D_MODEL).numpy()  # no version bump
    _check_current(ffn, x, "after a write through a numpy alias")
    ffn.key_weight.data[: 2 * G] += 5.0  # .data: no version bump either
    _check_current(ffn, x, "after a .data write")
    assert count_computes == [] and not ffn.means_cache.filled


def test_cache_not_used_while_keys_take_part_in_autograd(x, count_computes):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    ffn(x).sum().backward()  # eval mode, but the keys require grad and grad is on
    assert count_computes == [] and not ffn.means_cache.filled
    ffn.key_weight.requires_grad_(False)
    ffn.key_bias.requires_grad_(False)
    ffn(x).sum().backward()  # frozen keys: the cache serves (values still train)
    assert len(count_computes) == 1 and ffn.means_cache.filled


def test_mode_switches_load_state_dict_and_to_clear_the_cache(x):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    other = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)
    assert not torch.equal(_selection(ffn, x), _selection(other, x))
    actions = [lambda: ffn.train().eval(), lambda: ffn.load_state_dict(other.state_dict()),
               lambda: ffn.load_state_dict(other.state_dict(), assign=True),
               lambda: ffn.to(torch.float32), lambda: ffn.refresh_block_means()]
    for i, action in enumerate(actions):
        _check_current(ffn, x, f"before action {i}")
        assert ffn.means_cache.filled
        action()
        assert not ffn.means_cache.filled, f"action {i} left the cache filled"
    _check_current(ffn, x, "after loading the other weights")


def test_refresh_block_means_after_unseen_writes(x):
    """Eval mode plus a write that bypasses the version counter is the documented blind spot;
    refresh_block_means (method, module walk, one cache, every cache) makes it right."""
    model = nn.Sequential(sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K),
                          sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)).eval()
    refreshes = [lambda: model[0].refresh_block_means() or model[1].refresh_block_means(),
                 lambda: sfnn.refresh_block_means(model),
                 lambda: [sfnn.refresh_block_means(m.means_cache) for m in model],
                 lambda: sfnn.refresh_block_means()]
    for i, refresh in enumerate(refreshes):
        with torch.no_grad():
            model(x)
        for ffn in model:
            ffn.key_weight.data.copy_(torch.randn(D_FF, D_MODEL))  # unseen: .data
        refresh()
        for j, ffn in enumerate(model):
            _check_current(ffn, x, f"refresh {i}, layer {j}")
    with pytest.raises(TypeError, match="target must be"):
        sfnn.refresh_block_means("model")


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "own-cache"])
def test_fresh_bias_on_every_call(use_cache):
    """A key bias made on every call (scaled, cast, shifted) with persistent keys: freed
    biases' ids, data pointers and versions are reused, and must never match a stale entry."""
    _, keys, values, kb, ob = (None, torch.randn(D_FF, D_MODEL) * D_MODEL ** -0.5,
                               torch.randn(D_FF, D_MODEL) * D_FF ** -0.5, torch.randn(D_FF),
                               torch.randn(D_MODEL))
    kw = {"means_cache": sfnn.BlockMeansCache()} if use_cache else {}
    x = torch.randn(16, D_MODEL)
    for i in range(30):
        scale = 1.0 + 0.5 * i
        with torch.no_grad():  # the bias is a temporary, freed after the call
            y = sfnn.sparse_ffn(x, keys, values, block_size=G, top_k=K, key_bias=kb * scale,
                                out_bias=ob, **kw)
        ref = sparse_ffn_ref(x, keys, values, block_size=G, top_k=K, key_bias=kb * scale,
                             out_bias=ob)
        assert_close(y, ref, name=f"call {i}")


def test_returned_means_cannot_corrupt_later_calls(x):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    with torch.no_grad():
        ffn(x)
    for own_cache in (False, True):
        kw = {"means_cache": ffn.means_cache} if own_cache else {}
        kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=G, **kw)
        kbar.neg_()
        bbar.add_(100.0)
        _check_current(ffn, x, f"after writing the returned means (own cache: {own_cache})")
        assert_close(sfnn.sparse_ffn(x, ffn.key_weight.detach(), ffn.value_weight.detach(),
                                     block_size=G, top_k=K, key_bias=ffn.key_bias.detach(),
                                     out_bias=ffn.out_bias.detach()), _ref(ffn, x))


def test_inference_mode_never_leaks_inference_tensors(x):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)
    with torch.inference_mode():
        ffn(x)
        ffn.eval()(x)  # fills the eval cache inside inference mode
    kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=G)
    assert not kbar.is_inference() and not bbar.is_inference()
    kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=G,
                                  means_cache=ffn.means_cache)
    assert not kbar.is_inference() and not bbar.is_inference()
    assert ffn.means_cache.filled and not ffn.means_cache._entry.kbar.is_inference()
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        kbar, bbar = ffn.means_cache._lookup(ffn.key_weight, ffn.key_bias, G, "torch")
    (xg @ kbar.t() + bbar).square().sum().backward()  # autograd accepts the cached means
    assert xg.grad is not None
    for p in (ffn.key_weight, ffn.key_bias):
        p.requires_grad_(False)
    y = ffn(xg)  # a cache hit outside inference mode, with autograd on x
    y.sum().backward()
    assert_close(y, _ref(ffn, x))


@pytest.fixture
def swap_on_conversion():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swap_tensors_conversions_after_a_forward(x, swap_on_conversion, mode):
    """No weak reference sits on the parameters: swap_tensors (taken by .double(), .to() and
    load_state_dict under swap_module_params_on_conversion, and by DTensor) works."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).train(mode == "train")
    with torch.no_grad():
        ffn(x)
    ffn.double()
    assert ffn.key_weight.dtype == torch.float64
    _check_current(ffn, x.double(), "after double()")
    other = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K, dtype=torch.float64)
    ffn.load_state_dict(other.state_dict())
    _check_current(ffn, x.double(), "after load_state_dict")
    new = nn.Parameter(torch.randn(D_FF, D_MODEL, dtype=torch.float64))
    torch.utils.swap_tensors(ffn.key_weight, new)  # direct swap, same dtype and shape
    _check_current(ffn, x.double(), "after swap_tensors")
    ffn.to("meta")
    assert ffn.key_weight.is_meta


def test_torch_func_functional_call_grad_and_vmap(x):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K, activation="gelu")
    params = {k: v.detach() for k, v in ffn.named_parameters()}

    def loss(p, xs):
        return torch.func.functional_call(ffn, p, (xs,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    ffn(x).square().sum().backward()
    for name, p in ffn.named_parameters():
        assert_close(grads[name], p.grad, name=f"d{name}")
    keys = torch.randn(3, D_FF, D_MODEL) * D_MODEL ** -0.5
    with torch.no_grad():
        batched = torch.func.vmap(lambda k: sfnn.sparse_ffn(
            x[:9], k, ffn.value_weight, block_size=G, top_k=K, key_bias=ffn.key_bias))(keys)
        for i in range(3):
            one = sfnn.sparse_ffn(x[:9], keys[i], ffn.value_weight, block_size=G, top_k=K,
                                  key_bias=ffn.key_bias)
            assert_close(batched[i], one, name=f"vmap lane {i}")
    ffn.eval()
    with torch.no_grad():
        ffn(x)
        out = torch.func.functional_call(ffn, {"key_weight": keys[0]}, (x,))
    ref = sparse_ffn_ref(x, keys[0], ffn.value_weight, block_size=G, top_k=K,
                         key_bias=ffn.key_bias, out_bias=ffn.out_bias, activation="gelu")
    assert_close(out, ref, name="functional_call with other keys in eval mode")
    _check_current(ffn, x, "back on the module's own keys")


def test_copies_and_pickles_carry_no_means(x):
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    with torch.no_grad():
        ffn(x)
    assert ffn.means_cache.filled
    for twin in (copy.deepcopy(ffn), pickle.loads(pickle.dumps(ffn))):
        assert not twin.means_cache.filled
        with torch.no_grad():
            twin.key_weight.mul_(-1.0)
        _check_current(twin, x, "copy")
    _check_current(ffn, x, "original")


def test_module_caches_only_its_stored_keys(x, count_computes):
    """A parametrization makes a new key tensor on every access: no cache (each entry would keep
    one alive), and the layer stays right when the parametrization's originals change. A layer
    whose means_cache is None never caches; one unpickled from sfnn 0.1 gets a cache."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    torch.nn.utils.parametrizations.weight_norm(ffn, "key_weight", dim=0)
    _check_current(ffn, x, "weight_norm, first call")
    with torch.no_grad():
        ffn.parametrizations.key_weight.original1.mul_(-1.0)
    _check_current(ffn, x, "weight_norm, after changing the direction")
    assert count_computes == [] and not ffn.means_cache.filled
    plain = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    plain.means_cache = None
    _check_current(plain, x, "means_cache=None")
    plain.train().eval().refresh_block_means()
    state = {k: v for k, v in sfnn.SparseFFN(8, 32, block_size=8, top_k=1).__dict__.items()
             if k != "means_cache"}
    old = sfnn.SparseFFN.__new__(sfnn.SparseFFN)
    old.__setstate__(state)
    assert isinstance(old.means_cache, sfnn.BlockMeansCache)
    _check_current(old.eval(), torch.randn(3, 8), "a layer pickled without a cache")
    assert len(count_computes) == 1


def test_compute_is_the_one_place_means_are_made(x):
    """A subclass's compute serves every call made with the cache (a block-parallel layer would
    all-gather there): fills, and calls where the cache may not serve."""
    class Shifted(sfnn.BlockMeansCache):
        calls = 0

        def compute(self, keys, key_bias, block_size, backend):
            Shifted.calls += 1
            kbar, bbar = super().compute(keys, key_bias, block_size, backend)
            return kbar, bbar + 1000.0 * (torch.arange(bbar.numel()) == 2)

    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=1).eval()
    ffn.means_cache = Shifted()
    with torch.no_grad():
        ffn(x)
        ffn(x)
    assert Shifted.calls == 1
    with torch.no_grad():
        kbar, bbar = sfnn.block_means(ffn.key_weight, ffn.key_bias, block_size=G,
                                      means_cache=ffn.means_cache)
    assert sfnn.select_blocks(x, kbar, bbar, 1).unique().tolist() == [2]
    ffn(x).sum().backward()  # keys in autograd: not served, but computed by the subclass
    assert Shifted.calls == 2


def test_cache_steps_aside_while_a_cuda_graph_is_captured(x, monkeypatch, count_computes):
    """A captured graph must recompute the means on replay (the check runs on the host, so a
    cache hit would bake the old kbar into the graph)."""
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K).eval()
    monkeypatch.setattr(cache_mod, "_cuda_graph_capturing", lambda t: True)
    with torch.no_grad():
        ffn(x)
    assert count_computes == [] and not ffn.means_cache.filled


@pytest.mark.cuda
def test_cuda_graph_replay_sees_weight_updates():
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K, device="cuda").eval()
    x = torch.randn(4, D_MODEL, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # warm up (autotuning, caches) on a side stream
            ffn(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ffn(x)
        ffn.key_weight.copy_(torch.randn_like(ffn.key_weight))
        ffn.key_bias.copy_(torch.randn_like(ffn.key_bias))
        graph.replay()
    torch.cuda.synchronize()
    assert_close(y, _ref(ffn, x), name="replay after a weight update")


def _broadcast_worker(rank: int, world: int, port: int) -> None:
    """One rank; an assertion error ends it, and start_processes re-raises it in the test with
    this process's traceback (and stops the other rank)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different weights on each rank
        ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=G, top_k=K)
        x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(7))
        ffn(x).sum().backward()  # a training forward before the broadcast
        with torch.no_grad():
            ffn(x)
        for p in ffn.parameters():
            dist.broadcast(p.data, src=0)  # no version bump
        _check_current(ffn, x, f"rank {rank}: training mode after a broadcast")
        assert_close(ffn(x), _ref(ffn, x), name=f"rank {rank}: training forward")
        ffn.eval()
        _check_current(ffn, x, f"rank {rank}: eval before the second broadcast")
        if rank == 0:
            with torch.no_grad():
                ffn.key_weight.mul_(-1.0)
        dist.broadcast(ffn.key_weight.data, src=0)
        sfnn.refresh_block_means(ffn)  # the documented call after an unseen write
        _check_current(ffn, x, f"rank {rank}: eval after broadcast + refresh")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes: each pays torch's first-custom-op import (seconds)
def test_dist_broadcast_on_gloo_is_seen():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_broadcast_worker, args=(2, port), nprocs=2, join=True,
                       start_method="spawn")
