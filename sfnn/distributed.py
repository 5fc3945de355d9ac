"""Scale-out on torch.distributed: the block-parallel Avg-K sparse FFN.

Data parallel needs nothing from this module: :class:`sfnn.SparseFFN` holds plain
``nn.Parameter`` s, so DDP and FSDP2's ``fully_shard`` wrap it unchanged
(``tests/test_distributed.py`` trains both against a single process).

Block parallel (the expert-parallel pattern with blocks as experts) is
:class:`BlockParallelSparseFFN`: the ``n_blocks`` blocks are split contiguously over the ranks of
a process group, and each call moves token rows to the ranks that own their blocks:

1. every rank scores its own tokens against the full ``kbar`` table (``n_blocks x d_model``,
   all-gathered from the shards) and selects each token's ``top_k`` blocks, as
   :class:`sfnn.SparseFFN` does;
2. one small all_to_all of counts (the one host sync, see :meth:`BlockParallelSparseFFN.forward`);
3. each token's row is sent once to every rank that owns at least one of its blocks (a variable
   all_to_all; a row serves all of the token's blocks on that rank), with the local block ids of
   its (token, block) pairs in a second, integer all_to_all;
4. the owner computes the pairs with :func:`sfnn.block_ffn` over its local blocks, sums each
   row's pairs, and sends one partial output per row back (a third all_to_all);
5. the source rank sums its tokens' partials (float32, float64 for float64) and adds ``out_bias``.

Selection methods (``selection=``, as :class:`sfnn.SparseFFN`): ``avgk`` as above; ``hash`` and
``random`` need no block means (no all-gather), their block ids travel as Avg-K's do; ``switch``
and ``moe`` keep a replicated router (its gradient all-reduced by the layer, like ``out_bias``)
and their gates travel with the block ids, in a fourth all_to_all (differentiable), and scale
each pair's output on the owner.

The backward mirrors it: the two row all_to_alls are one autograd function whose backward is the
all_to_all with the split sizes swapped, so ``dy`` rows travel to the owners, the owners'
``block_ffn`` backward produces the shard's weight gradients (which stay on the owner) and the
rows' ``dx``, and ``dx`` travels back. No token is dropped and there is no capacity factor: a
rank computes exactly the pairs it receives.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import selection as selection_lib
from ._activations import ACTIVATIONS
from .functional import (
    _check_choice,
    _check_int,
    _check_selection,
    _check_weight,
    _check_x,
    block_ffn,
    block_means,
    select_blocks,
)
from .module import SparseFFN
from .ops import BACKENDS
from .selection import METHODS, ROUTER_METHODS, Selection

Tensor = torch.Tensor

__all__ = ["BlockParallelSparseFFN", "exclude_from_ddp"]

GRAD_REDUCTIONS = ("sum", "mean")
# The version of the checkpoint layout written by BlockParallelSparseFFN.state_dict().
_LAYOUT = "sfnn.BlockParallelSparseFFN/contiguous-blocks/1"

# Optimizer steps taken in this process (every torch.optim.Optimizer, fused ones included, calls
# the global step hooks). A step may change a shard without moving its version counter.
_optimizer_steps = 0
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; torch 2.11
# (the reference GPU environment) has only the old name.
_all_gather_single = (getattr(dist, "all_gather_single", None)
                      or getattr(dist, "all_gather_into_tensor", None))


class _Comm:
    """The process group and its collectives, each failure re-raised with what was running."""

    def __init__(self, process_group):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("BlockParallelSparseFFN needs torch.distributed: call "
                               "torch.distributed.init_process_group(...) on every rank first "
                               "(or use sfnn.SparseFFN on one device)")
        self.group = dist.group.WORLD if process_group is None else process_group
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of process_group")
        self.world = dist.get_world_size(self.group)

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as err:  # noqa: BLE001 - gloo/NCCL raise several types; keep the cause
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RuntimeError(
                f"sfnn BlockParallelSparseFFN: {what} failed on rank {self.rank} of "
                f"{self.world} ({type(err).__name__}: {first}). Another rank most likely raised "
                "inside the layer's forward or backward, stopped, or called the layer a "
                "different number of times: every rank of the process group must run each "
                "forward and each backward of the layer together. The process group's timeout "
                "(init_process_group(timeout=...)) bounds this wait; the group is unusable "
                "after this error.") from err

    def all_to_all(self, x: Tensor, out_splits: list[int], in_splits: list[int],
                   what: str) -> Tensor:
        """Rows of ``x`` (sum(in_splits), ...) to the ranks: (sum(out_splits), ...)."""
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        self._run(what, dist.all_to_all_single, out, x.contiguous(), out_splits, in_splits)
        return out

    def all_to_all_even(self, x: Tensor, what: str) -> Tensor:
        out = torch.empty_like(x)
        self._run(what, dist.all_to_all_single, out, x.contiguous())
        return out

    def all_gather(self, x: Tensor, what: str) -> Tensor:
        """(world * n, ...) from every rank's (n, ...), in rank order."""
        out = x.new_empty((self.world * x.shape[0],) + tuple(x.shape[1:]))
        self._run(what, _all_gather_single, out, x.contiguous())
        return out

    def all_reduce_(self, x: Tensor, what: str) -> Tensor:
        self._run(what, dist.all_reduce, x)
        return x


class _AllToAll(torch.autograd.Function):
    """Rows to their ranks; the backward sends the rows' gradients back the same way.

    ``anchor`` is an empty tensor that requires grad whenever grad mode is on, so that the node
    is recorded, and its backward collective runs, on every rank alike, whether or not this
    rank's input requires grad.
    """

    @staticmethod
    def forward(ctx, x, anchor, out_splits, in_splits, comm, what):
        ctx.meta = (out_splits, in_splits, comm, what)
        return comm.all_to_all(x, out_splits, in_splits, what)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        out_splits, in_splits, comm, what = ctx.meta
        dx = comm.all_to_all(dout, in_splits, out_splits, what + " (backward)")
        return dx, None, None, None, None, None


class _ReplicatedGrad(torch.autograd.Function):
    """Identity on a replicated parameter; the backward all-reduces its gradient (times scale)."""

    @staticmethod
    def forward(ctx, t, comm, scale):
        ctx.comm, ctx.scale = comm, scale
        return t.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad = ctx.comm.all_reduce_(grad.contiguous().clone(), "all-reduce of out_bias's "
                                    "gradient")
        if ctx.scale != 1.0:
            grad = grad * ctx.scale
        return grad, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _Plan(NamedTuple):
    """Where this rank's (token, block) pairs go. Rows are (token, destination) pairs, grouped by
    destination rank, tokens ascending; ``codes`` holds per pair ``row_in_dest * n_local +
    local_block``, in the same order."""

    send_tok: Tensor  # (R,) int64: the token of each row sent
    codes: Tensor  # (P,) int64
    rows_per_dest: Tensor  # (world,) int64
    pairs_per_dest: Tensor  # (world,) int64
    pair_order: Tensor  # (P,) int64: the flat (token * top_k + slot) index of each pair


def route(indices: Tensor, n_local: int, world: int) -> _Plan:
    """Group a rank's (token, block) pairs by the rank that owns the block.

    indices: (T, top_k) global block ids, owner ``b // n_local``. One row per (token, owner):
    a token's row is sent once to each rank that owns any of its blocks and serves all of them
    there. Returns the :class:`_Plan`; pure, no host sync.
    """
    T, k = indices.shape
    flat = indices.reshape(-1).long()
    dest = torch.div(flat, n_local, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)  # by owner, then token, then slot
    dest_s = dest[order]
    tok_s = torch.div(order, k, rounding_mode="floor")
    new_row = torch.ones_like(dest_s, dtype=torch.bool)
    new_row[1:] = (dest_s[1:] != dest_s[:-1]) | (tok_s[1:] != tok_s[:-1])
    row_id = torch.cumsum(new_row, 0) - 1
    rows_per_dest = torch.bincount(dest_s[new_row], minlength=world)
    pairs_per_dest = torch.bincount(dest_s, minlength=world)
    first_row = torch.cumsum(rows_per_dest, 0) - rows_per_dest
    codes = (row_id - first_row[dest_s]) * n_local + (flat[order] - dest_s * n_local)
    return _Plan(tok_s[new_row], codes, rows_per_dest, pairs_per_dest, order)


def _autocast_dtype(device_type: str):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_off(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _fingerprint(t: Tensor | None) -> list[Tensor]:
    """Three float64 numbers that differ, with overwhelming probability, between two tensors
    that differ (the sum, a position-weighted sum and the absolute sum), read chunk by chunk."""
    if t is None:
        z = torch.zeros((), dtype=torch.float64)
        return [z - 1, z - 1, z - 1]
    flat = t.detach().reshape(-1)
    s = torch.zeros(3, dtype=torch.float64, device=t.device)
    chunk = 1 << 22
    for start in range(0, flat.numel(), chunk):
        v = flat[start:start + chunk].double()
        w = (torch.arange(start, start + v.numel(), device=t.device, dtype=torch.int64) % 8191
             + 1).double()
        s += torch.stack([v.sum(), (v * w).sum(), v.abs().sum()])
    return list(s.cpu().unbind())


def _check_same_on_all_ranks(comm: _Comm, device, named: dict[str, list[Tensor]],
                             hint: str) -> None:
    """Raise ValueError, on every rank alike, when a named quantity differs between ranks."""
    names = list(named)
    flat = [v.double().reshape(()) for n in names for v in named[n]]
    mine = torch.stack(flat).to(device)
    every = comm.all_gather(mine[None], "the consistency check at construction").cpu()
    width = [len(named[n]) for n in names]
    bad: dict[str, list[int]] = {}
    for r in range(comm.world):
        col = 0
        for n, k in zip(names, width, strict=True):
            a, b = every[r, col:col + k], every[0, col:col + k]
            if not torch.allclose(a, b, rtol=1e-9, atol=0.0):
                bad.setdefault(n, []).append(r)
            col += k
    if bad:
        listing = "; ".join(f"{n} differs from rank 0's on ranks {rs}" for n, rs in bad.items())
        raise ValueError(f"BlockParallelSparseFFN: the ranks of the process group disagree: "
                         f"{listing}. {hint}")


class BlockParallelSparseFFN(nn.Module):
    """:class:`sfnn.SparseFFN` with its blocks split over the ranks of a process group.

    Each rank holds ``n_blocks / world_size`` contiguous blocks (rank ``r`` holds blocks
    ``[r * n_local, (r + 1) * n_local)``, i.e. rows ``[r * d_ff / world_size, (r + 1) * d_ff /
    world_size)`` of the full tables) and the whole ``out_bias``. Every rank calls the layer on
    its own tokens; the output for those tokens equals that of the single-device SparseFFN with
    the same weights (up to the order of float sums), and so do the gradients: the gradients of
    ``key_weight``, ``value_weight`` and ``key_bias`` are those of the sum of every rank's loss,
    and stay on the rank that owns the shard.

    Gated layers (``SparseFFN(..., gated=True)``) are not sharded yet:
    :meth:`from_sparse_ffn` refuses them with NotImplementedError.

    Parameters (on rank ``r``):
        key_weight, value_weight: (d_ff / world_size, d_model), the shard's rows.
        key_bias: (d_ff / world_size,) or None. out_bias: (d_model,) or None, replicated: its
        gradient is all-reduced by the layer, so every rank's copy sees the same gradient.

    Args:
        d_model, d_ff, block_size, top_k, activation, bias, backend, deterministic, device,
            dtype: as :class:`sfnn.SparseFFN`; ``d_ff // block_size`` must be divisible by the
            world size.
        grad_reduction: ``"sum"`` (the default: gradients of the sum of the ranks' losses, the
            single-device gradients of the global batch) or ``"mean"`` (divided by the world
            size, the convention of DDP, whose gradients are the mean over ranks; use it when
            the rest of the model trains under DDP, with :func:`exclude_from_ddp`).
        process_group: the group whose ranks share the blocks (default: the world group).

    Initialisation is :class:`sfnn.SparseFFN`'s distribution, drawn per block from a seed taken
    from the default generator: ranks seeded alike build one consistent layer, and the same seed
    gives the same layer at every world size. Construction checks that every rank passed the same
    configuration and drew the same seed, and raises ValueError on every rank otherwise.

    Selection: ``selection``, ``vocab_size``, ``seed``, ``balance_loss_weight`` and
    ``z_loss_weight`` as :class:`sfnn.SparseFFN` (``forward(x, token_ids=None)``;
    :meth:`aux_loss` is the loss of this rank's tokens, and ``sfnn.aux_loss(model)`` sums it
    with the model's other sparse layers). ``hash``: the table is replicated. ``random``: each
    rank draws its own tokens' blocks from the layer's seed, its call count and its rank (so a
    rank's draws differ from the single-device layer's, which numbers tokens globally).
    ``switch``/``moe``: the router ``router_weight`` (n_blocks, d_model) is replicated and its
    gradient all-reduced (times ``1 / world_size`` under ``grad_reduction="mean"``); the
    balancing loss is computed over each rank's own tokens. Not here yet: block-usage counting
    (``track_usage``).

    Every rank must call each forward (and each backward) of the layer together, in the same grad
    mode; a rank with no tokens passes an empty ``(0, d_model)`` input. ``torch.compile`` runs the
    layer eagerly (a graph break around it: its split sizes are data-dependent host values).
    Beside data parallelism for the rest of the model, leave the layer's parameters to it: DDP
    through :func:`exclude_from_ddp`, FSDP2 through ``fully_shard(model, ...,
    ignored_params=set(layer.parameters()))``; both average gradients, so build the layer with
    ``grad_reduction="mean"``. A ``DeviceMesh`` dimension's group (``mesh.get_group(dim)``) is a
    process group.

    Checkpoints: ``state_dict()`` of a shard holds the shard's rows under the SparseFFN names, the
    whole ``out_bias``, and ``_extra_state`` = ``{"layout", "rank", "world_size", "n_blocks",
    "block_size", "d_model"}``; it loads into the shard of the same rank of a layer of the same
    world size (anything else raises before a tensor is copied). For a checkpoint that loads at
    any world size, save :meth:`gather_full` (a SparseFFN) and shard it with
    :meth:`from_sparse_ffn`.

    Example:
        >>> dist.init_process_group("nccl")  # one process per GPU, e.g. under torchrun
        >>> torch.manual_seed(0)  # the same seed on every rank
        >>> ffn = sfnn.BlockParallelSparseFFN(4096, 65536, block_size=64, top_k=32,
        ...                                   device="cuda")
        >>> y = ffn(x)  # x: this rank's tokens (..., 4096)
    """

    def __init__(self, d_model: int, d_ff: int, *, block_size: int = 64, top_k: int = 8,
                 activation: str = "relu", bias: bool = True, backend: str = "auto",
                 deterministic: bool = False, grad_reduction: str = "sum",
                 selection: str = "avgk", vocab_size: int | None = None,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 0.0,
                 seed: int | None = None, process_group=None, device=None, dtype=None):
        super().__init__()
        if seed is None and selection in ("hash", "random"):
            seed = int(torch.randint(0, 2**62, ()).item())
        self._setup(d_model, d_ff, block_size, top_k, activation, (bias, bias), backend,
                    deterministic, grad_reduction, process_group, device, dtype,
                    (selection, vocab_size, balance_loss_weight, z_loss_weight, seed))
        seed = self.reset_parameters()
        self._check_consistent(
            {"seed": [torch.tensor([float(seed >> 31), float(seed & (2**31 - 1))])],
             "out_bias": _fingerprint(self.out_bias),
             "router_weight": _fingerprint(self.router_weight)},
            "Seed every rank alike (torch.manual_seed(s) with the same s) before constructing "
            "the layer.")

    def _setup(self, d_model, d_ff, block_size, top_k, activation, biases, backend,
               deterministic, grad_reduction, process_group, device, dtype,
               selection_config) -> None:
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("block_size", block_size),
                        ("top_k", top_k)):
            _check_int(name, v)
        if d_ff % block_size:
            raise ValueError(f"block_size={block_size} must divide d_ff={d_ff}")
        n_blocks = d_ff // block_size
        if top_k > n_blocks:
            raise ValueError(f"top_k={top_k} must be <= n_blocks = d_ff // block_size = "
                             f"{n_blocks}")
        comm = _Comm(process_group)
        if n_blocks % comm.world:
            raise ValueError(
                f"n_blocks = d_ff // block_size = {d_ff} // {block_size} = {n_blocks} is not "
                f"divisible by the process group's world size {comm.world}: every rank holds "
                f"n_blocks / world_size contiguous blocks. Choose d_ff, block_size or the group "
                f"so that it divides.")
        self.d_model, self.d_ff, self.block_size, self.top_k = d_model, d_ff, block_size, top_k
        self.activation = _check_choice("activation", activation, ACTIVATIONS)
        self.backend = _check_choice("backend", backend, BACKENDS)
        self.grad_reduction = _check_choice("grad_reduction", grad_reduction, GRAD_REDUCTIONS)
        self.deterministic = bool(deterministic)
        self._comm = comm
        self.process_group = comm.group
        self.n_local_blocks = n_blocks // comm.world
        self.block_offset = comm.rank * self.n_local_blocks
        rows = self.n_local_blocks * block_size
        factory = {"device": device, "dtype": dtype}
        self.key_weight = nn.Parameter(torch.empty(rows, d_model, **factory))
        self.value_weight = nn.Parameter(torch.empty(rows, d_model, **factory))
        has_key_bias, has_out_bias = biases
        self.key_bias = nn.Parameter(torch.empty(rows, **factory)) if has_key_bias else None
        self.out_bias = nn.Parameter(torch.empty(d_model, **factory)) if has_out_bias else None
        self._setup_selection(*selection_config, device=device, dtype=dtype)
        # The gathered (kbar, bbar) of every block, and the stamp it was gathered under.
        self._table: tuple[Tensor, Tensor | None] | None = None
        self._table_stamp = None
        self._generation = 0
        _ensure_step_hook()
        self._register_load_state_dict_pre_hook(_check_shard_checkpoint, with_module=True)
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    def _setup_selection(self, selection, vocab_size, balance_loss_weight, z_loss_weight, seed,
                         *, device, dtype) -> None:
        """The selection method's configuration and state: a replicated router (switch, moe),
        hash table (hash) or seed and call count (random)."""
        self.selection = _check_choice("selection", selection, METHODS)
        if selection == "hash" and vocab_size is None:
            raise ValueError("selection='hash' needs vocab_size, the number of token ids; then "
                             "call layer(x, token_ids=ids)")
        if vocab_size is not None:
            _check_int("vocab_size", vocab_size)
        self.vocab_size = vocab_size
        self.balance_loss_weight = _check_weight("balance_loss_weight", balance_loss_weight)
        self.z_loss_weight = _check_weight("z_loss_weight", z_loss_weight)
        self.seed = seed
        router = None
        if selection in ROUTER_METHODS:
            router = nn.Parameter(torch.empty(self.n_blocks, self.d_model, device=device,
                                              dtype=dtype))
        self.register_parameter("router_weight", router)
        table = None
        if selection == "hash":
            table = selection_lib.balanced_hash_table(vocab_size, self.n_blocks, self.top_k,
                                                      seed=seed).to(device)
        self.register_buffer("hash_table", table)
        rand = selection == "random"
        self.register_buffer("random_seed", torch.tensor(seed, dtype=torch.int64, device=device)
                             if rand else None)
        self.register_buffer("random_calls", torch.zeros((), dtype=torch.int64, device=device)
                             if rand else None)
        self._last_aux_loss: Tensor | None = None

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size

    def reset_parameters(self) -> int:
        """SparseFFN's initialisation (nn.Linear's, for fc1 and fc2), drawn per block.

        A seed comes from the default generator; block ``b``'s rows are drawn from a generator
        seeded by ``(seed, b)``, so the layer does not depend on the world size. Returns the seed.
        """
        seed = int(torch.randint(0, 2**62, (1,)).item())
        bound1, bound2 = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_ff)
        device = self.key_weight.device
        if device.type == "meta":
            return seed
        g = self.block_size
        gen = torch.Generator(device=device)
        with torch.no_grad():
            for lb in range(self.n_local_blocks):
                gen.manual_seed(_block_seed(seed, self.block_offset + lb))
                rows = slice(lb * g, (lb + 1) * g)
                self.key_weight[rows].uniform_(-bound1, bound1, generator=gen)
                self.value_weight[rows].uniform_(-bound2, bound2, generator=gen)
                if self.key_bias is not None:
                    self.key_bias[rows].uniform_(-bound1, bound1, generator=gen)
            if self.out_bias is not None:
                gen.manual_seed(_block_seed(seed, -1))
                self.out_bias.uniform_(-bound2, bound2, generator=gen)
            if self.router_weight is not None:
                gen.manual_seed(_block_seed(seed, -2))
                std = math.sqrt(0.1 / self.d_model)
                self.router_weight.normal_(0.0, std, generator=gen).clamp_(-2 * std, 2 * std)
        self.refresh()
        return seed

    @classmethod
    def from_sparse_ffn(cls, layer: SparseFFN, process_group=None, *,
                        grad_reduction: str = "sum") -> BlockParallelSparseFFN:
        """This rank's shard of ``layer``, which every rank of the group must hold identically
        (same configuration and weights; checked, ValueError on every rank otherwise). The shard
        copies its rows, so ``layer`` may be freed afterwards."""
        if not isinstance(layer, SparseFFN):
            raise TypeError(f"layer must be an sfnn.SparseFFN, got {type(layer).__name__}")
        if getattr(layer, "gated", False):
            raise NotImplementedError(
                "BlockParallelSparseFFN does not shard gated layers (SparseFFN(..., gated=True), "
                "SwiGLU/GeGLU) yet: keep the gated layer whole on each rank (DDP/FSDP), or use a "
                "plain FFN")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        w = layer.key_weight
        self._setup(layer.d_model, layer.d_ff, layer.block_size, layer.top_k, layer.activation,
                    (layer.key_bias is not None, layer.out_bias is not None), layer.backend,
                    layer.deterministic, grad_reduction, process_group, w.device, w.dtype,
                    (layer.selection, layer.vocab_size, layer.balance_loss_weight,
                     layer.z_loss_weight, layer.seed))
        rows = slice(self.rank * self.key_weight.shape[0],
                     (self.rank + 1) * self.key_weight.shape[0])
        with torch.no_grad():
            self.key_weight.copy_(layer.key_weight[rows])
            self.value_weight.copy_(layer.value_weight[rows])
            if self.key_bias is not None:
                self.key_bias.copy_(layer.key_bias[rows])
            if self.out_bias is not None:
                self.out_bias.copy_(layer.out_bias)
            for name in ("router_weight", "hash_table", "random_seed", "random_calls"):
                if getattr(self, name) is not None:
                    getattr(self, name).copy_(getattr(layer, name))
        self._check_consistent(
            {"key_weight": _fingerprint(layer.key_weight),
             "value_weight": _fingerprint(layer.value_weight),
             "key_bias": _fingerprint(layer.key_bias),
             "out_bias": _fingerprint(layer.out_bias),
             "router_weight": _fingerprint(layer.router_weight),
             "hash_table": _fingerprint(layer.hash_table),
             "random_seed": _fingerprint(layer.random_seed)},
            "from_sparse_ffn shards one layer that every rank holds identically: seed every rank "
            "alike before building it, or load the same checkpoint on every rank.")
        return self

    def _check_consistent(self, named: dict[str, list[Tensor]], hint: str) -> None:
        config = [float(v) for v in (self.d_model, self.d_ff, self.block_size, self.top_k,
                                     ACTIVATIONS.index(self.activation),
                                     GRAD_REDUCTIONS.index(self.grad_reduction),
                                     self.key_bias is not None, self.out_bias is not None,
                                     METHODS.index(self.selection), self.vocab_size or 0,
                                     self.balance_loss_weight, self.z_loss_weight)]
        what = ("configuration (d_model, d_ff, block_size, top_k, activation, grad_reduction, "
                "key_bias, out_bias, selection, vocab_size, balance_loss_weight, z_loss_weight)")
        named = {what: [torch.tensor(config, dtype=torch.float64)], **named}
        named = {k: [t.reshape(-1) for t in v] for k, v in named.items()}
        named = {k: list(torch.cat(v).unbind()) for k, v in named.items()}
        _check_same_on_all_ranks(self._comm, self.key_weight.device, named, hint)

    def gather_full(self) -> SparseFFN:
        """The whole layer as an :class:`sfnn.SparseFFN`, on every rank (for checkpoints and
        evaluation; it holds ``world_size`` times the shard's memory). A collective: call it on
        every rank."""
        full = SparseFFN(self.d_model, self.d_ff, block_size=self.block_size, top_k=self.top_k,
                         activation=self.activation, backend=self.backend,
                         deterministic=self.deterministic, selection=self.selection,
                         vocab_size=self.vocab_size, balance_loss_weight=self.balance_loss_weight,
                         z_loss_weight=self.z_loss_weight, seed=self.seed, device="meta",
                         dtype=self.key_weight.dtype)
        full = full.to_empty(device=self.key_weight.device)
        for name in ("key_bias", "out_bias"):
            if getattr(self, name) is None:
                setattr(full, name, None)
        with torch.no_grad():
            for name in ("key_weight", "value_weight", "key_bias"):
                shard = getattr(self, name)
                if shard is not None:
                    getattr(full, name).copy_(self._comm.all_gather(shard.detach(),
                                                                    f"gather_full ({name})"))
            if self.out_bias is not None:
                full.out_bias.copy_(self.out_bias)
            for name in ("router_weight", "hash_table", "random_seed", "random_calls"):
                if getattr(self, name) is not None:
                    getattr(full, name).copy_(getattr(self, name))
        return full

    def refresh(self) -> None:
        """Regather the block means at the next call. Needed only after a write that neither an
        optimizer step nor a version counter shows (``.data`` writes, ``dist.broadcast`` into a
        parameter, writes through a numpy alias); calling it on one rank is enough."""
        self._generation += 1

    def _apply(self, fn, recurse=True):
        self._table = None  # device or dtype moves
        self.refresh()
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict:
        return {"layout": _LAYOUT, "rank": self.rank, "world_size": self.world_size,
                "n_blocks": self.n_blocks, "block_size": self.block_size,
                "d_model": self.d_model}

    def set_extra_state(self, state) -> None:
        pass  # checked by _check_shard_checkpoint before any tensor is copied

    # ---------------------------------------------------------------- forward

    def _stamp(self):
        def version(t):
            if t is None:
                return None
            return (t.data_ptr(), None if t.is_inference() else t._version)

        return (self._generation, _optimizer_steps, version(self.key_weight),
                version(self.key_bias), self.key_weight.device, self.key_weight.dtype)

    def _weights_in_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(
            p is not None and p.requires_grad
            for p in (self.key_weight, self.value_weight, self.key_bias))

    def _gather_table(self) -> tuple[Tensor, Tensor | None]:
        """Every block's (kbar, bbar), float32 (float64 for float64 keys, as block_means gives):
        the local means all-gathered in rank order."""
        kb = self.key_bias
        # Fresh aliases: the layer decides when means are recomputed, so the functional cache
        # (keyed by tensor, which may predate a write it cannot see) is never consulted here.
        kbar, bbar = block_means(self.key_weight.detach(), None if kb is None else kb.detach(),
                                 block_size=self.block_size, backend=self.backend)
        local = kbar if bbar is None else torch.cat([kbar, bbar[:, None]], 1)
        full = self._comm.all_gather(local, "all-gather of the block means")
        table = (full[:, :self.d_model], None if bbar is None else full[:, self.d_model])
        self._table, self._table_stamp = table, self._stamp()
        return table

    def _prepare(self, x) -> Tensor:
        """Validate x and flatten it to (T, d_model), in the autocast dtype under autocast."""
        _check_x(x, self.d_model)
        w = self.key_weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {w.device}")
        x2d = x.reshape(-1, self.d_model)
        cast = _autocast_dtype(x.device.type)
        if cast is not None:
            return x2d.to(cast)
        if x2d.dtype != w.dtype:
            raise TypeError(f"x must have the layer's dtype {w.dtype} (or run under "
                            f"torch.autocast); got {x2d.dtype}")
        return x2d

    def _select(self, x2d: Tensor, table: tuple[Tensor, Tensor | None],
                token_ids: Tensor | None = None) -> Tensor | Selection:
        """The routing step, in one call so that another selection method can replace it:
        (T, top_k) global block ids (Avg-K: chosen on the full table), or a 2-D
        :class:`sfnn.Selection` (with gates and the aux loss) for the other methods.
        ``token_ids`` (T,), validated, is passed only when the method needs it (hash)."""
        if self.selection == "avgk":
            kbar, bbar = table
            with _autocast_off(x2d.device.type):
                return select_blocks(x2d, kbar, bbar, self.top_k, backend=self.backend)
        seed = None
        if self.selection == "random":
            seed = selection_lib.call_seed(selection_lib.call_seed(
                self.random_seed, self.random_calls), self.rank)
        router = self.router_weight
        if router is not None and torch.is_grad_enabled():
            scale = 1.0 / self.world_size if self.grad_reduction == "mean" else 1.0
            router = _ReplicatedGrad.apply(router, self._comm, scale)
        with _autocast_off(x2d.device.type):
            from .ops import resolve_backend

            backend = resolve_backend(self.backend, x2d.device, x2d.shape[0], False, x2d.dtype)
            return selection_lib.select(
                x2d, self.selection, top_k=self.top_k, n_blocks=self.n_blocks, backend=backend,
                router_weight=router, token_ids=token_ids, hash_table=self.hash_table, seed=seed,
                balance_loss_weight=self.balance_loss_weight, z_loss_weight=self.z_loss_weight)

    def aux_loss(self) -> Tensor:
        """() the auxiliary loss of this rank's tokens in the last forward (switch/moe: the
        weighted balancing loss and z-loss; zero otherwise and before the first forward)."""
        if self._last_aux_loss is None:
            return torch.zeros((), device=self.key_weight.device)
        return self._last_aux_loss

    def _empty_plan(self, device) -> _Plan:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        w = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        return _Plan(z, z, w, w, z)

    def _exchange_counts(self, plan: _Plan, error: Exception | None, stale: bool, device):
        """The counts all_to_all and the call's one device-to-host copy.

        Each rank sends every other rank (rows for it, pairs for it, error flag, stale flag) and
        receives the same from each. Returns (send_rows, send_pairs, recv_rows, recv_pairs) as
        host lists, the received counts as a device tensor, and whether any rank's table was
        stale; raises on every rank when any rank's input was invalid.
        """
        world = self.world_size
        send = torch.zeros(world, 4, dtype=torch.int64, device=device)
        send[:, 0] = plan.rows_per_dest
        send[:, 1] = plan.pairs_per_dest
        send[:, 2] = int(error is not None)
        send[:, 3] = int(stale)
        recv = self._comm.all_to_all_even(send, "all_to_all of the split sizes")
        host = torch.cat([send, recv]).tolist()  # the one host sync of the call
        sent, got = host[:world], host[world:]
        failed = [r for r in range(world) if got[r][2]]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(
                f"sfnn BlockParallelSparseFFN: rank(s) {failed} of the process group raised "
                f"inside forward before any data was exchanged (see their error); rank "
                f"{self.rank} raises too, so that no rank waits for the others. The process "
                f"group is still usable.")
        counts = ([s[0] for s in sent], [s[1] for s in sent], [g[0] for g in got],
                  [g[1] for g in got])
        return counts, recv, any(g[3] for g in got)

    @torch.compiler.disable
    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """(..., d_model) -> (..., d_model): this rank's tokens through the whole layer.
        ``token_ids`` (x's leading shape) are needed by ``selection="hash"``.

        The one host sync per call: the all_to_alls of token rows take their split sizes as
        host integers (NCCL and gloo both do), and those sizes depend on the selection (how many
        of this rank's tokens chose each rank's blocks). So the counts go to their ranks first
        in one small all_to_all of ``world_size x 4`` integers, and one device-to-host copy
        reads them; no other call waits for the device. (This is also why the layer cannot be
        captured in a CUDA graph and runs eagerly under ``torch.compile``.) The same exchange
        carries two flags per rank, so that every rank takes the same decision without a
        second sync: "my input was invalid, or my selection failed" (every rank then raises,
        and the group stays usable) and "my copy of the block-means table is stale".

        The block means: while the weights take part in autograd (training), every call
        all-gathers the ranks' means (``n_blocks x (d_model + 1)`` float32, no host sync),
        because the weights change between steps. Otherwise (inference, frozen weights) the
        gathered table is cached; a rank whose shard changed since (its version counter, an
        optimizer step, :meth:`load_state_dict`, :meth:`refresh`, a device move) raises the
        stale flag, and then every rank gathers the table again and selects again: no rank
        ever selects with stale means, and the cost of a change is one repeated selection and
        counts exchange.
        """
        error, x2d, ids = None, None, None
        try:
            x2d = self._prepare(x)
            ids = _check_selection(self.selection, x, self.n_blocks, self.top_k,
                                   self.router_weight, token_ids, self.hash_table, None)
        except Exception as err:  # noqa: BLE001 - raised on every rank after the counts exchange
            error = err
        device = self.key_weight.device
        if self.selection != "avgk":
            table = ()  # no block means needed
        elif self._weights_in_autograd():
            table = self._gather_table()
        elif self._table is not None and self._table_stamp == self._stamp():
            table = self._table
        else:
            table = None
        if self.random_calls is not None:
            with torch.no_grad():
                self.random_calls.add_(1)
        gates = None
        for _ in range(2):
            plan = self._empty_plan(device)
            if error is None and table is not None:
                try:
                    args = (x2d, table) if ids is None else (x2d, table, ids)
                    sel = self._select(*args)
                    if isinstance(sel, Selection):
                        indices, gates = sel.indices, sel.gates
                        self._last_aux_loss = sel.aux_loss
                    else:
                        indices = sel
                    plan = route(indices, self.n_local_blocks, self.world_size)
                except Exception as err:  # noqa: BLE001 - as for invalid input
                    error = err
            counts, recv, any_stale = self._exchange_counts(plan, error, table is None, device)
            if not any_stale:
                break
            table = self._gather_table()
        y2d = self._dispatch_compute_combine(x2d, plan, counts, recv, gates)
        return y2d.reshape(x.shape[:-1] + (self.d_model,))

    def _dispatch_compute_combine(self, x2d: Tensor, plan: _Plan, counts, recv: Tensor,
                                  gates: Tensor | None = None) -> Tensor:
        send_rows, send_pairs, recv_rows, recv_pairs = counts
        comm, d, n_local = self._comm, self.d_model, self.n_local_blocks
        acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
        anchor = None
        if torch.is_grad_enabled():
            anchor = torch.empty(0, device=x2d.device, requires_grad=True)
        # Dispatch: one row per (token, owner), and the pairs' local block ids.
        x_send = x2d.index_select(0, plan.send_tok)
        x_recv = _AllToAll.apply(x_send, anchor, recv_rows, send_rows, comm,
                                 "all_to_all of token rows")
        codes = comm.all_to_all(plan.codes, recv_pairs, send_pairs,
                                "all_to_all of block ids")
        n_pairs = codes.shape[0]
        src = torch.repeat_interleave(torch.arange(self.world_size, device=x2d.device),
                                      recv[:, 1], output_size=n_pairs)
        first_row = torch.cumsum(recv[:, 0], 0) - recv[:, 0]
        pair_row = torch.div(codes, n_local, rounding_mode="floor") + first_row[src]
        local_block = codes % n_local
        # Compute: the owner's blocks, with the same block_ffn as the single-device layer.
        kw, vw, kb = self.key_weight, self.value_weight, self.key_bias
        if self.grad_reduction == "mean" and self.world_size > 1 and torch.is_grad_enabled():
            scale = 1.0 / self.world_size
            kw, vw = _ScaleGrad.apply(kw, scale), _ScaleGrad.apply(vw, scale)
            kb = None if kb is None else _ScaleGrad.apply(kb, scale)
        pair_gates = None
        if self.router_weight is not None:
            # Every rank runs this all_to_all (a rank with no tokens sends no gates).
            g_send = x2d.new_zeros(0, dtype=acc) if gates is None else \
                gates.reshape(-1)[plan.pair_order]
            pair_gates = _AllToAll.apply(g_send, anchor, recv_pairs, send_pairs, comm,
                                         "all_to_all of gates")[:, None]
        y_pairs = block_ffn(x_recv.index_select(0, pair_row), kw, vw, local_block[:, None],
                            block_size=self.block_size, key_bias=kb, gates=pair_gates,
                            activation=self.activation, backend=self.backend,
                            deterministic=self.deterministic)
        y_rows = x_recv.new_zeros(x_recv.shape[0], d, dtype=acc).index_add(
            0, pair_row, y_pairs.to(acc)).to(x2d.dtype)
        # Combine: each row's partial output back to its token's rank, summed there.
        y_back = _AllToAll.apply(y_rows, anchor, send_rows, recv_rows, comm,
                                 "all_to_all of partial outputs")
        y = x2d.new_zeros(x2d.shape[0], d, dtype=acc).index_add(0, plan.send_tok,
                                                                 y_back.to(acc))
        if self.out_bias is not None:
            ob = self.out_bias
            if torch.is_grad_enabled():
                scale = 1.0 / self.world_size if self.grad_reduction == "mean" else 1.0
                ob = _ReplicatedGrad.apply(ob, comm, scale)
            y = y + ob.to(acc)
        return y.to(x2d.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
                f"top_k={self.top_k}, activation={self.activation!r}, "
                f"key_bias={self.key_bias is not None}, out_bias={self.out_bias is not None}, "
                f"backend={self.backend!r}, "
                f"rank={self.rank}, world_size={self.world_size}, "
                f"blocks=[{self.block_offset}, {self.block_offset + self.n_local_blocks}), "
                f"grad_reduction={self.grad_reduction!r}, selection={self.selection!r}")


def _block_seed(seed: int, block: int) -> int:
    """A generator seed for one block (block -1: out_bias), well spread over 63 bits."""
    return (seed * 6364136223846793005 + (block + 2) * 1442695040888963407) % (2**63)


def _check_shard_checkpoint(module: BlockParallelSparseFFN, state_dict, prefix, local_metadata,
                            strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Refuse, before any tensor is copied, a checkpoint of another shard or layout."""
    key = prefix + "_extra_state"
    if key not in state_dict:
        if strict:
            raise ValueError(
                f"{key} is missing: this is not the state_dict of a BlockParallelSparseFFN shard. "
                f"A full SparseFFN checkpoint loads into a SparseFFN; shard it with "
                f"BlockParallelSparseFFN.from_sparse_ffn(layer, process_group).")
        return
    saved = state_dict[key]
    mine = module.get_extra_state()
    if not isinstance(saved, dict) or saved.get("layout") != _LAYOUT:
        raise ValueError(f"{key}: unknown checkpoint layout {saved!r}; expected {_LAYOUT!r}")
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: checkpoint {a} vs this layer {b}" for k, (a, b) in diff.items())
        raise ValueError(
            f"this checkpoint holds another shard ({listing}). A shard's state_dict loads only "
            f"into the same rank of a layer of the same world size and shape; for another world "
            f"size save gather_full() and shard it with from_sparse_ffn().")


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel to leave every BlockParallelSparseFFN in ``model`` alone.

    DDP would otherwise broadcast rank 0's shard over every rank's at construction and average
    shard gradients that belong to different blocks. The layer reduces its own ``out_bias``
    gradient; build it with ``grad_reduction="mean"`` so that its gradients follow DDP's
    averaging. Call before wrapping ``model`` in DDP; returns the names excluded.
    """
    names = [f"{mod_name}.{p_name}" if mod_name else p_name
             for mod_name, mod in model.named_modules() if isinstance(mod, BlockParallelSparseFFN)
             for p_name, _ in mod.named_parameters(recurse=False)]
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, already + [n for n in names if n not in already])
    return names
