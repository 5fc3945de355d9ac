"""sfnn on torch.distributed, on the CPU with gloo: DDP and FSDP2 around SparseFFN unchanged, and
the block-parallel layer (sfnn.distributed.BlockParallelSparseFFN) against one process.

Each test launches its ranks with torch.multiprocessing from a forkserver that has imported torch
and sfnn once, so a launch costs a fork, not an import. Every rank computes the single-process
result itself (same seeds, every rank's inputs) and checks its own part; a failing assertion in a
rank fails the test with that rank's traceback. Ranks run one intra-op thread each.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import pathlib
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sfnn
from sfnn.distributed import BlockParallelSparseFFN, exclude_from_ddp, route
from sfnn.testing import TOLERANCES, assert_close

# A launch that runs longer than this is killed and fails (a hang must not stall CI).
LAUNCH_TIMEOUT_S = 120.0
# The gloo timeout inside the ranks; the failure tests set a short one.
PG_TIMEOUT_S = 60.0
# torch.compile's backend in the compile tests: aot_eager (Dynamo's graph capture, DDP's graph
# splitting, FSDP2's hooks and AOTAutograd with sfnn's registered ops) keeps them to seconds;
# SFNN_COMPILE_BACKEND=inductor runs the same tests through Inductor's C++ code generation
# (passes, about a minute each on this 2-core machine).
COMPILE_BACKEND = os.environ.get("SFNN_COMPILE_BACKEND", "aot_eager")

mp.set_forkserver_preload(["torch", "sfnn", "sfnn.distributed", __name__])


def _entry(rank, world, store, pg_timeout, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(world: int, fn, *args, pg_timeout: float = PG_TIMEOUT_S) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise any rank's failure."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world, os.path.join(tmp, "store"), pg_timeout, fn,
                                               args),
                                 nprocs=world, join=False, start_method="forkserver")
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{fn.__name__} at world size {world} did not finish "
                                         f"in {LAUNCH_TIMEOUT_S:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


def _tol(pair) -> dict:
    return {"atol": pair[0], "rtol": pair[1]}


def _rows(full: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    if full is None:
        return None
    n = full.shape[0] // world
    return full[rank * n:(rank + 1) * n]


def _check_grads(layer: BlockParallelSparseFFN, full: sfnn.SparseFFN, rank, world, tol,
                 scale=1.0) -> None:
    for name in ("key_weight", "value_weight", "key_bias"):
        mine, ref = getattr(layer, name), getattr(full, name)
        if ref is None:
            assert mine is None
            continue
        assert_close(mine.grad, _rows(ref.grad, rank, world) * scale, **_tol(tol),
                     name=f"rank {rank}: d{name}")
    if full.out_bias is not None:
        assert_close(layer.out_bias.grad, full.out_bias.grad * scale, **_tol(tol),
                     name=f"rank {rank}: dout_bias")


# ------------------------------------------------------------------- the routing plan (no ranks)


def test_route_sends_one_row_per_token_and_owner():
    g = torch.Generator().manual_seed(0)
    n_local, world, T, k = 3, 4, 37, 5
    indices = torch.stack([torch.randperm(n_local * world, generator=g)[:k] for _ in range(T)])
    plan = route(indices.int(), n_local, world)
    owners = indices // n_local
    expected_rows = sorted({(int(o), t) for t in range(T) for o in owners[t]})
    rows_per_dest = plan.rows_per_dest.tolist()
    dest_of_row = [d for d in range(world) for _ in range(rows_per_dest[d])]
    assert list(zip(dest_of_row, plan.send_tok.tolist(), strict=True)) == expected_rows
    assert plan.pairs_per_dest.tolist() == torch.bincount(owners.reshape(-1),
                                                          minlength=world).tolist()
    assert sum(rows_per_dest) < T * k  # some tokens chose two blocks of one owner: rows shared
    # Decode every pair: (row within its owner's chunk, local block) -> (token, global block).
    pairs, start_row, start_pair = set(), 0, 0
    for d in range(world):
        n_pairs = plan.pairs_per_dest[d].item()
        for c in plan.codes[start_pair:start_pair + n_pairs].tolist():
            row, lb = divmod(c, n_local)
            pairs.add((plan.send_tok[start_row + row].item(), d * n_local + lb))
        start_row += rows_per_dest[d]
        start_pair += n_pairs
    assert pairs == {(t, int(b)) for t in range(T) for b in indices[t]}


def test_route_empty():
    plan = route(torch.zeros(0, 2, dtype=torch.int32), 4, 3)
    assert plan.send_tok.numel() == 0 and plan.codes.numel() == 0
    assert plan.rows_per_dest.tolist() == [0, 0, 0] == plan.pairs_per_dest.tolist()


def _bench_model():
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "distributed.py"
    spec = importlib.util.spec_from_file_location("sfnn_bench_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cost_model_rows_match_the_routing():
    """bench/distributed.py's rows per token (uniform routing) is what route() sends."""
    bm = _bench_model()
    n_blocks, world, k, T = 64, 4, 8, 4000
    g = torch.Generator().manual_seed(0)
    indices = torch.rand(T, n_blocks, generator=g).argsort(1)[:, :k]  # k distinct, uniform
    plan = route(indices, n_blocks // world, world)
    measured = plan.rows_per_dest.sum().item() / T  # the token's own rank included
    p = bm.owner_probability(n_blocks, world, k)
    assert abs(measured - world * p) < 0.02 * measured, (measured, world * p)
    c = bm.layer_costs(d_model=32, block_size=4, top_k=k, n_blocks=n_blocks, world=world,
                       gpus_per_node=2)
    assert c["rows_remote"] == pytest.approx((world - 1) * p)
    assert c["rows_intra"] + c["rows_inter"] == pytest.approx(c["rows_remote"])
    assert c["pairs_remote"] == pytest.approx(k * (world - 1) / world)
    assert c["fwd_bytes"] < c["fwd_bytes_no_sharing"]
    assert bm.owner_probability(8, 4, 7) == 1.0  # 7 blocks cannot avoid a rank holding 2


def test_cost_model_table(capsys):
    assert _bench_model().main(["model"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 * 4  # the header, then 3 layers at 8, 16, 32 and 64 GPUs


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        BlockParallelSparseFFN(16, 64, block_size=4, top_k=2)


# ------------------------------------------------- block parallel against the single-device layer

# (name, dtype, activation, bias, block_size, top_k, hot): ``hot`` gives one block's cells a key
# bias of +50, so every token chooses it; with top_k=1 no other block (so no other rank) gets a
# token. Token counts per rank are uneven and rank 1 has none.
SCENARIOS = [
    ("f64-relu-bias", torch.float64, "relu", True, 4, 5, None),
    ("f32-gelu-nobias", torch.float32, "gelu", False, 8, 3, None),
    ("bf16-silu-bias", torch.bfloat16, "silu", True, 4, 4, None),
    ("f64-hot-block-k3", torch.float64, "relu", True, 4, 3, 5),
    ("f64-hot-block-k1", torch.float64, "gelu", True, 4, 1, 13),
]
TOKENS = [7, 0, 3, 11]
D_MODEL, D_FF = 24, 96


def _scenario_inputs(world, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, c, D_MODEL, generator=g).to(dtype) for c in TOKENS[:world]]
    dys = [torch.randn(2, c, D_MODEL, generator=g).to(dtype) for c in TOKENS[:world]]
    return xs, dys


def _full_layer(dtype, activation, bias, block_size, top_k, hot, seed=0):
    torch.manual_seed(seed)
    full = sfnn.SparseFFN(D_MODEL, D_FF, block_size=block_size, top_k=top_k,
                          activation=activation, bias=bias, backend="torch", dtype=dtype)
    if hot is not None:
        with torch.no_grad():
            full.key_bias[hot * block_size:(hot + 1) * block_size] = 50.0
    return full


def _matches_single_device(rank, world):
    for name, dtype, activation, bias, block_size, top_k, hot in SCENARIOS:
        tol = TOLERANCES[dtype]
        full = _full_layer(dtype, activation, bias, block_size, top_k, hot)
        layer = BlockParallelSparseFFN.from_sparse_ffn(full)
        xs, dys = _scenario_inputs(world, dtype)
        x_all = torch.cat(xs, 1).requires_grad_()
        (full(x_all) * torch.cat(dys, 1)).sum().backward()
        off = sum(TOKENS[:rank])
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        (y * dys[rank]).sum().backward()
        y_ref = full(x_all)[:, off:off + TOKENS[rank]]
        assert y.shape == xs[rank].shape and y.dtype == dtype
        assert_close(y, y_ref, **_tol(tol), name=f"{name} rank {rank}: y")
        assert_close(x.grad, x_all.grad[:, off:off + TOKENS[rank]], **_tol(tol),
                     name=f"{name} rank {rank}: dx")
        _check_grads(layer, full, rank, world, tol)
        # The gathered table is the single-device layer's block means, exactly.
        kbar, bbar = layer._gather_table()
        kbar_ref, bbar_ref = sfnn.block_means(full.key_weight, full.key_bias,
                                              block_size=block_size)
        assert torch.equal(kbar, kbar_ref)
        assert (bbar is None and bbar_ref is None) or torch.equal(bbar, bbar_ref)
        if hot is not None and top_k == 1:
            owner = hot // layer.n_local_blocks
            received = layer.value_weight.grad.abs().sum().item()
            assert (received > 0) == (rank == owner), (name, rank, owner, received)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_block_parallel_matches_single_device(world):
    launch(world, _matches_single_device)


def _grad_edge_cases(rank, world):
    """x requiring grad on some ranks only, frozen weights, and no grad mode at all."""
    full = _full_layer(torch.float64, "relu", True, 4, 3, None)
    layer = BlockParallelSparseFFN.from_sparse_ffn(full)
    xs, dys = _scenario_inputs(world, torch.float64, seed=2)
    x_all = torch.cat(xs, 1).requires_grad_()
    (full(x_all) * torch.cat(dys, 1)).sum().backward()
    off = sum(TOKENS[:rank])
    # Only rank 0's x requires grad: the other ranks still run the backward collectives.
    x = xs[rank].clone().requires_grad_(rank == 0)
    (layer(x) * dys[rank]).sum().backward()
    if rank == 0:
        assert_close(x.grad, x_all.grad[:, off:off + TOKENS[0]], name="dx")
    _check_grads(layer, full, rank, world, TOLERANCES[torch.float64])
    # Frozen weights (the cached table serves in grad mode), x requiring grad everywhere.
    for p in layer.parameters():
        p.requires_grad_(False)
    x = xs[rank].clone().requires_grad_()
    (layer(x) * dys[rank]).sum().backward()
    assert_close(x.grad, x_all.grad[:, off:off + TOKENS[rank]], name="dx, frozen weights")
    with torch.no_grad():
        y = layer(xs[rank])
    assert_close(y, full(x_all)[:, off:off + TOKENS[rank]], name="y under no_grad")
    # A table gathered under inference_mode, then used in grad mode.
    layer.refresh()
    with torch.inference_mode():
        y_inf = layer(xs[rank])
    assert torch.equal(y, y_inf)
    x = xs[rank].clone().requires_grad_()
    (layer(x) * dys[rank]).sum().backward()
    assert_close(x.grad, x_all.grad[:, off:off + TOKENS[rank]], name="dx after inference_mode")


@pytest.mark.parametrize("world", [2, 4])
def test_block_parallel_grad_edge_cases(world):
    launch(world, _grad_edge_cases)


def _autocast(rank, world):
    full = _full_layer(torch.float32, "gelu", True, 4, 3, None)
    layer = BlockParallelSparseFFN.from_sparse_ffn(full)
    xs, _ = _scenario_inputs(world, torch.float32, seed=3)
    off = sum(TOKENS[:rank])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xs[rank])
        y_ref = full(torch.cat(xs, 1))[:, off:off + TOKENS[rank]]
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, **_tol(TOLERANCES[torch.bfloat16]), name="y under autocast")


def test_block_parallel_autocast():
    launch(2, _autocast)


# ------------------------------------------------------------- the block-means table is never stale


def _table_cache(rank, world):
    torch.manual_seed(0)
    layer = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3, dtype=torch.float64)
    gathers = []
    original = layer._gather_table
    layer._gather_table = lambda: gathers.append(1) or original()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(9, D_MODEL, generator=g, dtype=torch.float64)

    selections = []

    def check(what):
        full = layer.gather_full()
        with torch.no_grad():
            assert_close(layer(x), full(x), name=f"rank {rank}: {what}")
        # Every change below moves the selection, so a stale table could not pass.
        selections.append(sfnn.select_blocks(x, *sfnn.block_means(
            full.key_weight, full.key_bias, block_size=4, backend="reference"), top_k=3))
        if len(selections) > 1:
            assert not torch.equal(selections[-1], selections[-2]), what

    check("first call")
    n = len(gathers)
    with torch.no_grad():
        layer(x)
    assert len(gathers) == n, "an unchanged layer must not gather the means again"
    # An in-place write on one rank only: that rank raises the stale flag, every rank regathers.
    with torch.no_grad():
        if rank == world - 1:
            layer.key_weight.mul_(-1.0)
    check("after an in-place write on one rank")
    assert len(gathers) > n
    # A write no version counter shows, then refresh() on that rank alone.
    with torch.no_grad():
        if rank == 0:
            layer.key_weight.data.copy_(torch.randn_like(layer.key_weight))
            layer.refresh()
    check("after a .data write and refresh()")
    # A fused optimizer step (does not move version counters): the step hook invalidates.
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True)
    (layer(x) ** 2).sum().backward()
    opt.step()
    check("after a fused AdamW step")
    # load_state_dict of other weights.
    sd = {k: (v.neg() if torch.is_tensor(v) else v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd)
    check("after load_state_dict")


def test_block_parallel_table_never_stale():
    launch(2, _table_cache)


# --------------------------------------------------------------------------- training, with DDP


class _Net(torch.nn.Module):
    """Linear -> FFN -> Linear, the FFN a SparseFFN or a BlockParallelSparseFFN."""

    def __init__(self, ffn, d=D_MODEL):
        super().__init__()
        self.inp, self.ffn, self.out = torch.nn.Linear(d, d), ffn, torch.nn.Linear(d, 1)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)) + self.ffn(x))


def _net_single(dtype=torch.float64, backend="reference"):
    torch.manual_seed(0)
    ffn = sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3, backend=backend, dtype=dtype)
    net = _Net(ffn).to(dtype)
    return net


def _batches(world, per_rank=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(world * per_rank, D_MODEL, generator=g, dtype=dtype)
    t = torch.randn(world * per_rank, 1, generator=g, dtype=dtype)
    return x, t


def _train(net, params, x, t, opt_kind, steps=2):
    if opt_kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=0.2, **({"fused": True} if opt_kind == "fused"
                                                    else {"foreach": False}))
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - t) ** 2).mean().backward()
        opt.step()


def _assert_selection_moved(ffn_before, ffn_after, x_in):
    """The test can fail: on the trained layer's input, the means before training select other
    blocks than the means after it (so a stale table would change the output)."""
    sel = [sfnn.select_blocks(x_in, *sfnn.block_means(f.key_weight, f.key_bias,
                                                       block_size=f.block_size,
                                                       backend="reference"), top_k=f.top_k)
           for f in (ffn_before, ffn_after)]
    assert not torch.equal(*sel), "the selection did not change: a stale table would go unseen"


def _block_parallel_in_data_parallel(rank, world, wrapper, opt_kind, compiled):
    """The FFN block-parallel, the rest of the model data-parallel (DDP or FSDP2, the layer's
    parameters left out of both): two steps equal one process on the global batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, t = _batches(world)
    ref = _net_single()
    before = _net_single()
    _train(ref, ref.parameters(), x, t, "adam" if opt_kind == "fused" else opt_kind)
    with torch.no_grad():
        _assert_selection_moved(before.ffn, ref.ffn, x)
    torch.manual_seed(0)
    net = _Net(BlockParallelSparseFFN.from_sparse_ffn(
        sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3, dtype=torch.float64),
        grad_reduction="mean")).double()
    net.inp.load_state_dict(before.inp.state_dict())
    net.out.load_state_dict(before.out.state_dict())
    if wrapper == "ddp":
        assert exclude_from_ddp(net) == ["ffn.key_weight", "ffn.value_weight", "ffn.key_bias",
                                         "ffn.out_bias"]
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (net.inp, net.out):
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(net, mesh=mesh, ignored_params=set(net.ffn.parameters()))
    if compiled:
        wrapped = torch.compile(wrapped, backend=COMPILE_BACKEND)
    rows = slice(rank * 6, (rank + 1) * 6)
    _train(wrapped, wrapped.parameters(), x[rows], t[rows], opt_kind)
    full = net.ffn.gather_full()
    for name, p in ref.named_parameters():
        if name.startswith("ffn."):
            mine = getattr(full, name[4:])
        else:
            mine = net.get_parameter(name)
            mine = mine.full_tensor() if hasattr(mine, "full_tensor") else mine
        assert_close(mine, p, atol=1e-9, rtol=1e-9, name=f"rank {rank}: {name}")


@pytest.mark.parametrize("wrapper,opt_kind,compiled", [
    ("ddp", "sgd", False),
    ("ddp", "fused", False),
    ("fsdp2", "adam", False),
    ("ddp", "adam", True),
])
def test_block_parallel_in_data_parallel_trains_like_one_process(wrapper, opt_kind, compiled):
    launch(2, _block_parallel_in_data_parallel, wrapper, opt_kind, compiled)


# ------------------------------------------------------------------------ checkpoints and errors


def _state_dict_roundtrip(rank, world):
    torch.manual_seed(0)
    a = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    torch.manual_seed(1)
    b = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    sd = a.state_dict()
    assert sd["_extra_state"] == {"layout": "sfnn.BlockParallelSparseFFN/contiguous-blocks/1",
                                  "rank": rank, "world_size": world, "n_blocks": 24,
                                  "block_size": 4, "d_model": D_MODEL}
    assert sd["key_weight"].shape == (D_FF // world, D_MODEL) and sd["out_bias"].shape == (D_MODEL,)
    b.load_state_dict(sd)
    for name, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(name))
    x = torch.randn(5, D_MODEL)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    # Another rank's shard: refused before anything is copied.
    torch.manual_seed(2)
    c = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    before = c.key_weight.clone()
    other = dict(sd, _extra_state=dict(sd["_extra_state"], rank=(rank + 1) % world))
    with pytest.raises(ValueError, match="another shard"):
        c.load_state_dict(other)
    other = dict(sd, _extra_state=dict(sd["_extra_state"], world_size=world * 2))
    with pytest.raises(ValueError, match="world_size: checkpoint"):
        c.load_state_dict(other)
    assert torch.equal(c.key_weight, before)
    with pytest.raises(ValueError, match="from_sparse_ffn"):
        c.load_state_dict(sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3).state_dict())
    # The initialisation does not depend on the world size: compare with a one-rank group.
    single = dist.new_group([0])
    full = a.gather_full()
    if rank == 0:
        torch.manual_seed(0)
        alone = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3, process_group=single)
        for name, p in alone.named_parameters():
            assert torch.equal(p, full.get_parameter(name)), name


def test_block_parallel_state_dict(tmp_path):
    launch(2, _state_dict_roundtrip)


def _bad_configurations(rank, world):
    with pytest.raises(ValueError, match="not divisible by the process group's world size 4"):
        BlockParallelSparseFFN(D_MODEL, 24, block_size=4, top_k=2)  # 6 blocks on 4 ranks
    # Different weights on different ranks.
    torch.manual_seed(rank)
    full = sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    with pytest.raises(ValueError, match=r"key_weight differs from rank 0's on ranks \[1, 2, 3\]"):
        BlockParallelSparseFFN.from_sparse_ffn(full)
    torch.manual_seed(0)
    full = sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    if rank == 2:
        with torch.no_grad():
            full.out_bias[0] += 1e-3
    with pytest.raises(ValueError, match=r"out_bias differs from rank 0's on ranks \[2\]"):
        BlockParallelSparseFFN.from_sparse_ffn(full)
    # Ranks seeded differently, or configured differently.
    torch.manual_seed(rank % 2)
    with pytest.raises(ValueError, match=r"seed differs from rank 0's on ranks \[1, 3\]"):
        BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"configuration .* differs from rank 0's on ranks \[3\]"):
        BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3 if rank < 3 else 2)
    # The group is still in step after every refused construction.
    torch.manual_seed(0)
    layer = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    with torch.no_grad():
        layer(torch.randn(3, D_MODEL))


def test_block_parallel_bad_configurations():
    launch(4, _bad_configurations)


# Well under the group's 30 s timeout (waiting for it fails the test), well over a busy CI
# machine's time for one forward in a fresh process (which may load the CPU kernel first).
NO_WAIT_S = 10.0


def _bad_input_on_one_rank(rank, world):
    torch.manual_seed(0)
    layer = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    x = torch.randn(4, D_MODEL if rank != 1 else D_MODEL + 1)
    start = time.monotonic()
    if rank == 1:
        with pytest.raises(ValueError, match="d_model=24"):
            layer(x)
    else:
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] .* raised inside forward"):
            layer(x)
    assert time.monotonic() - start < NO_WAIT_S, "the other ranks must not wait for a timeout"
    # Nothing was exchanged: the group is still usable.
    y = layer(torch.randn(4, D_MODEL))
    y.sum().backward()
    # The same for a failure in one rank's selection step.
    if rank == 1:
        def broken(x2d, table):
            raise RuntimeError("rank 1's selection failed")

        layer._select = broken
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1's selection failed" if rank == 1 else
                       r"rank\(s\) \[1\] .* raised inside forward"):
        layer(torch.randn(4, D_MODEL))
    assert time.monotonic() - start < NO_WAIT_S


def test_block_parallel_bad_input_on_one_rank_fails_every_rank_at_once():
    launch(2, _bad_input_on_one_rank, pg_timeout=30.0)


FAIL_TIMEOUT_S = 2.0


def _rank_raises_inside_forward(rank, world, done_dir):
    import sfnn.distributed as sd

    torch.manual_seed(0)
    layer = BlockParallelSparseFFN(D_MODEL, D_FF, block_size=4, top_k=3)
    x = torch.randn(8, D_MODEL)
    if rank == 1:
        def broken(*args, **kwargs):
            raise MemoryError("rank 1 ran out of memory in block_ffn")

        sd.block_ffn = broken
        with pytest.raises(MemoryError):
            layer(x)
        # Alive but silent until the others are done: they must time out, not hang.
        deadline = time.monotonic() + FAIL_TIMEOUT_S + 10.0
        while len(os.listdir(done_dir)) < world - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="sfnn BlockParallelSparseFFN: all_to_all .* failed on "
                                           f"rank {rank} of {world}"):
        layer(x)
    elapsed = time.monotonic() - start
    open(os.path.join(done_dir, str(rank)), "w").close()
    assert elapsed < FAIL_TIMEOUT_S + 3.0, elapsed


@pytest.mark.parametrize("world", [2, 4])
def test_rank_that_raises_inside_forward_fails_the_others_within_the_timeout(world, tmp_path):
    launch(world, _rank_raises_inside_forward, str(tmp_path), pg_timeout=FAIL_TIMEOUT_S)


# ----------------------------------------------------- data parallel around SparseFFN, unchanged


def _data_parallel(rank, world, wrapper, opt_kind, variant):
    """Two training steps of a model with two SparseFFN layers under DDP or FSDP2 equal one
    process on the global batch; the reference (backend="reference") has no means cache."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def model(backend, seed=0):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(D_MODEL, D_MODEL),
            sfnn.SparseFFN(D_MODEL, D_FF, block_size=4, top_k=3, backend=backend),
            sfnn.SparseFFN(D_MODEL, D_FF, block_size=8, top_k=2, activation="gelu",
                           backend=backend),
            torch.nn.Linear(D_MODEL, 1)).double()

    x, t = _batches(world)
    ref, before = model("reference"), model("reference")
    _train(ref, ref.parameters(), x, t, "adam" if opt_kind == "fused" else opt_kind)
    with torch.no_grad():
        for i in (1, 2):
            _assert_selection_moved(before[i], ref[i], ref[:i](x))
    rows = slice(rank * 6, (rank + 1) * 6)
    # warm-cache: ranks other than 0 start from other weights and fill the means cache before
    # wrapping; DDP's broadcast of rank 0's (the reference's) weights moves no version counter,
    # and must still be seen.
    net = model("auto", seed=0 if variant != "warm-cache" or rank == 0 else 100 + rank)
    if variant == "warm-cache":
        with torch.no_grad():
            net(x[rows])
    if wrapper == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
        if variant == "compile":
            wrapped = torch.compile(wrapped, backend=COMPILE_BACKEND)
    else:
        mesh = init_device_mesh("cpu", (world,))
        for layer in net:
            fully_shard(layer, mesh=mesh, reshard_after_forward=variant != "keep-unsharded")
        fully_shard(net, mesh=mesh)
        wrapped = torch.compile(net, backend=COMPILE_BACKEND) if variant == "compile" else net
    _train(wrapped, net.parameters(), x[rows], t[rows], opt_kind)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
              for n, p in net.named_parameters()}
    for name, p in ref.named_parameters():
        assert_close(params[name], p, atol=1e-9, rtol=1e-9, name=f"rank {rank}: {name}")
    with torch.no_grad():
        assert_close(wrapped(x[rows]), ref(x[rows]), atol=1e-9, rtol=1e-9,
                     name=f"rank {rank}: output after training")


@pytest.mark.parametrize("wrapper,opt_kind,variant", [
    ("ddp", "sgd", "plain"),
    ("ddp", "adam", "plain"),
    ("ddp", "fused", "plain"),  # failed at 4de209b: the old cache missed fused steps
    ("ddp", "sgd", "warm-cache"),
    ("ddp", "adam", "compile"),
    ("fsdp2", "sgd", "plain"),
    ("fsdp2", "fused", "plain"),
    ("fsdp2", "fused", "keep-unsharded"),
    ("fsdp2", "adam", "compile"),
])
def test_data_parallel_trains_like_one_process(wrapper, opt_kind, variant):
    launch(2, _data_parallel, wrapper, opt_kind, variant)
