"""Block selection: the paper's methods beside Avg-K, decided in one place.

Liu et al. (EMNLP 2023) compare, at the same number of active cells, ways of choosing each
token's memory blocks. Every method here turns the tokens ``x`` (T, d_model) into

- ``indices`` (T, top_k) int32: the token's blocks (distinct within a token),
- ``gates`` (T, top_k) float32 (float64 for float64 ``x``) or None: the weight of each slot's
  output, differentiable with respect to the router and ``x``,
- an auxiliary loss (a scalar, zero for methods that have none),

and the compute half (:func:`sfnn.ops.block_ffn_op` with ``gates=``, on every backend) does the
rest. Routing is **dropless**: there is no capacity factor and no token is dropped, whatever the
load of a block.

- ``avgk``: the top_k blocks by ``x . kbar_b + bbar_b`` (mean keys); no gate, parameter or
  loss.
- ``switch``: the top_k blocks by router logit ``W_r x`` (``router_weight`` (n_blocks,
  d_model)), each scaled by its softmax probability; balancing loss (+ optional z-loss).
- ``moe``: the same router and choice, scaled by the softmax over the chosen logits
  (renormalised); the same losses.
- ``hash``: HashLayer, a fixed balanced random map token id -> top_k blocks (a table, no
  parameter); no gate, no loss.
- ``random``: top_k distinct blocks drawn uniformly per token per call (a control, from a seed);
  no gate, no loss.

Exact top-k over cells (the paper's unrestricted memory) is ``avgk`` with ``block_size=1``.

The balancing loss is Switch Transformer's, ``n_blocks * sum_b f_b * P_b`` with ``f_b`` the
fraction of the (token, slot) assignments that went to block ``b`` (so the loss is 1 at a
perfectly balanced load for any ``top_k``) and ``P_b`` the mean over tokens of the router's
softmax probability of ``b``; it is differentiable through ``P_b`` only. The router z-loss is
ST-MoE's ``mean_t logsumexp_b(logits)^2``.

On the GPU the learned router writes its ``(T, n_blocks)`` float32 logits (the gates and the
balancing loss need them) and the softmax of them, and takes the top-k with the fused Avg-K
kernel (``sfnn::select_blocks``, the router weight standing in for ``kbar``), which writes only
``(T, top_k)`` indices: no sort keys or sorted copies of the logits are written.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import ops, reference, torch_path

Tensor = torch.Tensor

METHODS = ("avgk", "switch", "moe", "hash", "random")
ROUTER_METHODS = ("switch", "moe")

__all__ = ["METHODS", "ROUTER_METHODS", "Selection", "balanced_hash_table", "random_blocks",
           "usage_summary"]


class Selection(NamedTuple):
    """What a selection method decided for a call.

    indices: (..., top_k) int32 block ids, distinct within a token.
    gates: (..., top_k) float32 (float64 for float64 x) per-slot weights, or None (weight 1).
    aux_loss: () the weighted auxiliary loss to add to the training loss:
        ``balance_loss_weight * balance_loss + z_loss_weight * z_loss`` (zero without a router).
    balance_loss: () the unweighted Switch balancing loss (zero without a router).
    z_loss: () the unweighted router z-loss (zero without a router).
    """

    indices: Tensor
    gates: Tensor | None
    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor


# --------------------------------------------------------------------------- learned router

def router_logits(x2d: Tensor, router_weight: Tensor) -> Tensor:
    """(T, n_blocks) router logits ``x W_r^T`` in float32 (float64 for float64 x), whatever the
    inputs' dtype (the router runs in full precision, as Switch Transformer's does)."""
    dtype = ops.means_dtype(x2d.dtype)
    return x2d.to(dtype) @ router_weight.to(dtype).t()


def topk_of_scores(scores: Tensor, top_k: int) -> Tensor:
    """int32 (T, top_k): the columns of the ``top_k`` largest scores per row, best first, ties to
    the smaller column (the rule of Avg-K's selection; float64 rows are ranked in float64)."""
    if scores.dtype == torch.float64:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[:, :top_k].to(torch.int32)
    n = scores.shape[-1]
    best = torch.topk(torch_path.ordered_score_keys(scores), top_k, dim=-1, sorted=True).values
    return (n - 1 - (best & 0xFFFFFFFF)).to(torch.int32)


def _router_indices(x2d: Tensor, router_weight: Tensor, logits: Tensor, top_k: int,
                    backend: str, route: str | None) -> Tensor:
    """The top_k blocks by router logit. On the kernel backends the fused Avg-K top-k with the
    router weight as the table (no (T, n_blocks) sort keys written); on the torch path and the
    transforms' routes a top-k of the logits already computed."""
    if backend == "torch" or route is not None:
        return topk_of_scores(logits.detach(), top_k)
    w = router_weight.detach().to(torch.float32).contiguous()
    return ops.select_blocks(x2d.detach().contiguous(), w, None, top_k, backend)


def balance_loss(probs: Tensor, indices: Tensor, n_blocks: int) -> Tensor:
    """Switch's load-balancing loss ``n_blocks * sum_b f_b * P_b`` (1 at a uniform load).

    probs: (T, n_blocks) router softmax (differentiable); indices: (T, top_k) chosen blocks.
    ``f_b`` is the fraction of the T * top_k assignments sent to block b (counted on the device
    with ``index_add_``: no host sync, deterministic), ``P_b`` the mean probability of b.
    Zero for T == 0.
    """
    T, top_k = indices.shape
    counts = torch.zeros(n_blocks, dtype=probs.dtype, device=probs.device)
    flat = indices.reshape(-1).long()
    counts = counts.index_add(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    f = counts / max(T * top_k, 1)
    p = probs.sum(0) / max(T, 1)
    return n_blocks * (f * p).sum()


def init_router_(weight: Tensor) -> Tensor:
    """Switch Transformer's router initialisation, in place: a truncated normal with standard
    deviation ``sqrt(0.1 / d_model)``, cut at two standard deviations."""
    std = math.sqrt(0.1 / weight.shape[1])
    with torch.no_grad():
        return torch.nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


# --------------------------------------------------------------------------- hash

def balanced_hash_table(vocab_size: int, n_blocks: int, top_k: int, *, seed: int = 0) -> Tensor:
    """HashLayer's map, balanced: int32 (vocab_size, top_k), row ``v`` the blocks of token id v.

    A random permutation of the blocks is laid end to end as often as needed
    (``vocab_size * top_k`` slots) and cut into windows of ``top_k``; token ids take the windows
    in a random order. Every block therefore appears in ``floor`` or ``ceil`` of
    ``vocab_size * top_k / n_blocks`` rows (counts differ by at most one), and a window that
    straddles two permutations is made distinct by moving, in the later permutation, the blocks
    the earlier one already gave it past the window (to the first positions holding other
    blocks). Blocks are distinct within a row. The same arguments give the same table on every
    machine (torch's CPU generator seeded with ``seed``); ``SparseFFN`` keeps it as a buffer,
    so checkpoints carry the map itself.
    """
    for name, v in (("vocab_size", vocab_size), ("n_blocks", n_blocks), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if top_k > n_blocks:
        raise ValueError(f"top_k={top_k} must be <= n_blocks={n_blocks}")
    gen = torch.Generator().manual_seed(int(seed))
    total = vocab_size * top_k
    n_perm = -(-total // n_blocks)
    perms = torch.argsort(torch.rand(n_perm, n_blocks, generator=gen), dim=1).numpy().copy()
    if n_blocks % top_k:
        for i in range(n_perm - 1):
            start = ((i + 1) * n_blocks // top_k) * top_k  # the straddling window's first slot
            a = (i + 1) * n_blocks - start  # its slots in permutation i
            if a == 0 or start >= total:
                continue
            _push_out(perms[i + 1], set(perms[i][n_blocks - a:].tolist()), top_k - a)
    seq = perms.reshape(-1)[:total].reshape(vocab_size, top_k)
    order = torch.randperm(vocab_size, generator=gen).numpy()
    table = np.empty_like(seq)
    table[order] = seq
    return torch.from_numpy(table.astype(np.int32))


def _push_out(perm: np.ndarray, taken: set, head: int) -> None:
    """Move the blocks in ``taken`` out of ``perm[:head]``, in place, by swapping each with the
    first later position that holds a block not in ``taken`` (one exists: see the caller)."""
    j = head
    for i in range(head):
        if int(perm[i]) in taken:
            while int(perm[j]) in taken:
                j += 1
            perm[i], perm[j] = perm[j], perm[i]
            j += 1


def hash_indices(token_ids: Tensor, hash_table: Tensor) -> Tensor:
    """int32 (T, top_k): the rows of ``hash_table`` (vocab_size, top_k) for the flat
    ``token_ids`` (T,)."""
    return hash_table.index_select(0, token_ids.long()).to(torch.int32)


# --------------------------------------------------------------------------- random

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``x * c mod 2**32`` for 32-bit ``x`` (an int64 tensor or a Python int): split so that no
    intermediate exceeds 2**49, since int64 overflow is not defined."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32) on int64 tensors or Python ints
    holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_words(seed):
    """The two 32-bit words of a 64-bit seed (an int, or an int64 tensor)."""
    return seed & _M32, (seed >> 32) & _M32


def call_seed(seed, counter: Tensor) -> Tensor:
    """An int64 () seed for one call of a layer: ``seed`` (its fixed seed, an int or an int64 ()
    tensor) and ``counter`` (an int64 () tensor it increments per call) hashed together,
    63 bits, no host sync."""
    lo, hi = _seed_words(seed)
    c_lo, c_hi = _seed_words(counter)
    h1 = mix32(mix32(mix32(lo ^ 0x243F6A88) ^ hi) ^ c_lo)
    h1 = mix32(h1 ^ c_hi)
    h2 = mix32(h1 ^ 0x13198A2E)
    return ((h2 & 0x7FFFFFFF) << 32) | h1


def random_blocks(n_tokens: int, n_blocks: int, top_k: int, seed, *,
                  device: torch.device | str = "cpu") -> Tensor:
    """int32 (n_tokens, top_k): for each token ``top_k`` distinct blocks drawn uniformly.

    Counter-based: block b of token t gets the key ``mix32(h(seed, t) ^ mix32(b ^ c))`` (a
    bijective 32-bit hash of the seed's words, the token's index and the block's) and the token
    takes the ``top_k`` largest keys, so the choice is a uniformly random subset in a random
    order (keys are compared on 31 bits; a tie, probability about n_blocks^2 / 2^32 per token,
    goes to the smaller block). Pure int64 tensor ops: the same draws on every device and
    backend, no host sync, traceable by torch.compile. ``seed``: a Python int or an int64 ()
    tensor; the same seed gives the same draws.
    """
    device = torch.device(device)
    if isinstance(seed, Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    lo, hi = _seed_words(seed)
    h0 = mix32(mix32(lo ^ 0x243F6A88) ^ hi)
    t = torch.arange(n_tokens, device=device, dtype=torch.int64)
    ht = mix32(mix32(h0 ^ (t & _M32)) ^ (t >> 32))  # [T]
    b = torch.arange(n_blocks, device=device, dtype=torch.int64)
    hb = mix32(b ^ 0x9E3779B9)  # [n_blocks]
    key = mix32(ht[:, None] ^ hb[None, :])  # [T, n_blocks]
    packed = ((key >> 1) << 32) | (n_blocks - 1 - b)
    best = torch.topk(packed, top_k, dim=-1, sorted=True).values
    return (n_blocks - 1 - (best & _M32)).to(torch.int32)


def resolve_seed(seed, device: torch.device):
    """The seed of a ``random`` call: an int stays an int (hashed on the host, nothing moves);
    an int64 tensor moves to ``device``; a ``torch.Generator`` gives a fresh 62-bit draw from
    it; None a fresh draw from the default generator of ``device`` (reproducible under
    ``torch.manual_seed``). Draws stay on the device: no host sync."""
    if seed is None:
        return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Generator):
        draw = torch.randint(0, 2**62, (), device=seed.device, dtype=torch.int64, generator=seed)
        return draw.to(device)
    if isinstance(seed, Tensor):
        return seed.to(device=device, dtype=torch.int64)
    return int(seed)


# --------------------------------------------------------------------------- one place

def select(x2d: Tensor, method: str, *, top_k: int, n_blocks: int, backend: str,
           route: str | None = None, kbar: Tensor | None = None, bbar: Tensor | None = None,
           router_weight: Tensor | None = None, token_ids: Tensor | None = None,
           hash_table: Tensor | None = None, seed=None, balance_loss_weight: float = 0.0,
           z_loss_weight: float = 0.0) -> Selection:
    """Run selection ``method`` on validated tokens: the one place each method is decided.

    x2d: (T, d_model), possibly requiring grad (gates of ``switch``/``moe`` are differentiable
    in it and in ``router_weight``). backend: the concrete backend ("torch", "triton", "cuda");
    route: :func:`sfnn.ops.transform_route`'s answer ("dense" is the caller's, through the
    reference). kbar/bbar (avgk): float block means. router_weight (switch/moe): (n_blocks,
    d_model). token_ids (hash): (T,) integer, in range. hash_table (hash): (vocab, top_k) int.
    seed (random): int or int64 () tensor (see :func:`resolve_seed`).

    Returns a 2-D :class:`Selection` (indices (T, top_k)). (On the registered ops' route
    :func:`sfnn.sparse_ffn` runs Avg-K as one step with the FFN, :func:`sfnn.ops.avgk_ffn`,
    whose indices are the same, and wraps them with :func:`ungated`.)
    """
    T = x2d.shape[0]
    if method == "avgk":
        return ungated(avgk_indices(x2d, kbar, bbar, top_k, backend, route), x2d)
    if method == "hash":
        return ungated(hash_indices(token_ids, hash_table), x2d)
    if method == "random":
        return ungated(random_blocks(T, n_blocks, top_k, seed, device=x2d.device), x2d)
    if method not in ROUTER_METHODS:
        raise ValueError(f"selection must be one of {METHODS}, got {method!r}")
    logits = router_logits(x2d, router_weight)  # [T, n_blocks]
    idx = _router_indices(x2d, router_weight, logits, top_k, backend, route)
    lse = torch.logsumexp(logits, dim=-1)  # [T]
    probs = torch.exp(logits - lse[:, None])  # [T, n_blocks]
    if method == "switch":
        gates = probs.gather(1, idx.long())
    else:
        gates = torch.softmax(logits.gather(1, idx.long()), dim=-1)
    bal = balance_loss(probs, idx, n_blocks)
    z = lse.square().sum() / max(T, 1)
    aux = balance_loss_weight * bal + z_loss_weight * z
    return Selection(idx, gates, aux, bal, z)


def ungated(indices: Tensor, x2d: Tensor) -> Selection:
    """The :class:`Selection` of a method without gates or auxiliary loss (avgk, hash, random):
    ``indices`` and zero losses in :func:`sfnn.ops.means_dtype` of ``x2d`` (on its device)."""
    zero = torch.zeros((), dtype=ops.means_dtype(x2d.dtype), device=x2d.device)
    return Selection(indices, None, zero, zero, zero)


def avgk_indices(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int, backend: str,
                 route: str | None) -> Tensor:
    """int32 (T, top_k) Avg-K blocks on ``x2d.detach()``: the registered op, or plain torch ops
    on a transform's route (see :func:`sfnn.ops.transform_route`)."""
    x2d = x2d.detach()
    if route == "dense":
        return reference.select_blocks_ref(x2d, kbar, bbar, top_k)
    if route == "composite":
        return torch_path.select_blocks(x2d, kbar, bbar, top_k)
    return ops.select_blocks(x2d, kbar, bbar, top_k, backend)


# --------------------------------------------------------------------------- usage

def accumulate_usage(counts: Tensor, indices: Tensor) -> None:
    """``counts[b] += #(token, slot) pairs that chose b``, in place, on the device (index_add_:
    no host sync, unlike ``torch.bincount`` on CUDA, and deterministic). counts: (n_blocks,)
    int64; indices: (..., top_k) integer."""
    flat = indices.reshape(-1).to(device=counts.device, dtype=torch.int64)
    with torch.no_grad():
        counts.index_add_(0, flat, torch.ones_like(flat))


def usage_summary(counts: Tensor) -> dict:
    """The load statistics of per-block ``counts`` (n_blocks,) (reads them: one host sync).

    Returns a dict: ``counts`` (a CPU int64 copy), ``total`` (assignments counted), ``cv`` (the
    coefficient of variation of the load, std / mean, population std: 0 when uniform),
    ``entropy`` (the load's entropy over ``log(n_blocks)``: 1 when uniform, 0 when one block
    takes everything), ``dead_fraction`` (blocks never chosen / n_blocks) and ``max_over_mean``
    (the busiest block's load over the mean: 1 when uniform). With nothing counted yet
    (total 0) cv, entropy and max_over_mean are NaN and dead_fraction is 1.
    """
    c = counts.detach().to("cpu", torch.int64).clone()
    n = c.numel()
    total = int(c.sum())
    load = c.double()
    nan = float("nan")
    if total == 0:
        return {"counts": c, "total": 0, "cv": nan, "entropy": nan, "dead_fraction": 1.0,
                "max_over_mean": nan}
    mean = load.mean()
    p = load / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(n)) if n > 1 else 1.0
    return {"counts": c, "total": total,
            "cv": float(load.std(correction=0) / mean),
            "entropy": entropy,
            "dead_fraction": float((c == 0).sum()) / n,
            "max_over_mean": float(load.max() / mean)}
