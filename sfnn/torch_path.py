"""The torch backend: the CPU path, and the fallback wherever Triton cannot run.

Block-grouped and honest with memory: the (token, slot) pairs are sorted by block (indices only),
each block's tokens are gathered and computed with two dense GEMMs over the block's g rows, and the
results are scattered back. The (tokens, d_ff) activation and per-token weight copies are never
formed; the forward keeps only the selected cells' pre-activations, (tokens * top_k, g), for the
backward, which is written by hand and reuses the same grouping.

On CPU tensors three implementations share that contract:

- the CPU kernel (:mod:`sfnn.cpu_kernel`, C++ built just in time where a compiler is present):
  the whole forward or backward in one parallel region, the fused loops of a decode step for
  blocks chosen by a few tokens; plain and gated FFNs. Used whenever it is available.
- without it, a CPU forward of at most :data:`FEW_TOKENS` tokens that needs no backward gathers the
  distinct selected blocks' rows and computes them with a handful of ops
  (:func:`few_token_fwd`): decoding reads about the selected blocks' bytes.
- otherwise a loop over the selected blocks of small ATen ops (:func:`grouped_block_ffn_fwd`,
  :func:`grouped_block_ffn_bwd`); the only path on CUDA tensors.

Functions follow the backend protocol of :mod:`sfnn.ops`: inputs are validated and contiguous,
``indices`` is int32 (T, top_k) with T >= 1, ``gates`` is float32 (T, top_k) or None.
"""
from __future__ import annotations

import torch

from ._activations import activation_grad, apply_activation

Tensor = torch.Tensor

# The largest forward (tokens) that takes the few-token path when the CPU kernel is absent.
# Measured side by side at d_model 512, d_ff 8192, g 64, top_k 16, fp32, one thread (2-core
# EPYC, loaded machine): few-token vs grouped loop over dense 9.2x/8.8x at T=1, 1.8x/1.6x at
# T=4, 0.96x/0.64x at T=8, 0.67x/0.80x at T=16 (with two threads on the loaded machine the
# few-token path won at every T up to 32: fewer ops, fewer barriers).
FEW_TOKENS = 8
# The few-token path gathers blocks smaller than this (key + value rows) into groups of at most
# FEW_TOKEN_GROUP_BYTES, whose copies are read back from cache; bigger blocks are used in place
# (a copy would cost more than the op per block it saves).
FEW_TOKEN_GATHER_BELOW = 512 * 2**10
FEW_TOKEN_GROUP_BYTES = 8 * 2**20


def _cpu_kernel(t: Tensor):
    """The CPU kernel module when it serves tensors like ``t``, else None: plain CPU tensors
    only, never a torch.func transform's wrapped tensors or a tensor subclass (the transforms'
    routes call this module for its torch ops)."""
    if (t.device.type != "cpu" or type(t) is not torch.Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(t)):
        return None
    from . import cpu_kernel

    return cpu_kernel if cpu_kernel.available() else None


def block_means(keys: Tensor, key_bias: Tensor | None, block_size: int):
    """kbar (n_blocks, d_model) and bbar (n_blocks,) in float32 (float64 for float64 keys)."""
    d_ff, d_model = keys.shape
    n_blocks = d_ff // block_size
    acc = _acc_dtype(keys.dtype)
    kbar = keys.reshape(n_blocks, block_size, d_model).mean(1, dtype=acc)
    bbar = None
    if key_bias is not None:
        bbar = key_bias.reshape(n_blocks, block_size).mean(1, dtype=acc)
    return kbar, bbar


def block_scores(x2d: Tensor, kbar: Tensor, bbar: Tensor | None) -> Tensor:
    """Avg-K scores (T, n_blocks) in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    xs, ks = x2d.to(dtype), kbar.to(dtype)
    if bbar is None:
        return xs @ ks.t()
    return torch.addmm(bbar.to(dtype), xs, ks.t())


def ordered_score_keys(scores: Tensor) -> Tensor:
    """Pack each score and its block index into one int64 whose order is (score, -index).

    The high 32 bits are the float32 score's bits remapped so that signed-integer order equals
    float order; the low 32 bits are ``n_blocks - 1 - index``, so among equal scores the smaller
    block index wins. One top-k over these keys is the selection, ties included, and every key
    is distinct, so even a NaN score yields valid, distinct indices. (The Triton kernel uses the
    same packing.)
    """
    n_blocks = scores.shape[-1]
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as integers: flip their magnitude bits.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    index = torch.arange(n_blocks, device=scores.device, dtype=torch.int64)
    return (bits.to(torch.int64) << 32) | (n_blocks - 1 - index)


def select_blocks(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int) -> Tensor:
    """The top_k blocks of largest score per token, best first, ties to the smaller index.

    x2d: (T, d_model); kbar: (n_blocks, d_model) float32. Returns int32 (T, top_k). float64
    inputs are ranked by their float64 scores (a stable sort: the packed keys hold float32).
    """
    n_blocks = kbar.shape[0]
    if x2d.dtype != torch.float64 and kbar.dtype != torch.float64:
        kernel = _cpu_kernel(x2d)
        if kernel is not None:  # the same keys in one parallel region instead of ~10 ops
            return kernel.select_blocks(x2d, kbar, bbar, top_k)
    scores = block_scores(x2d, kbar, bbar)
    if scores.dtype == torch.float64:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        return order[:, :top_k].to(torch.int32)
    keys = ordered_score_keys(scores)
    best = torch.topk(keys, top_k, dim=-1, sorted=True).values
    return (n_blocks - 1 - (best & 0xFFFFFFFF)).to(torch.int32)


def _sort_pairs(indices: Tensor, n_blocks: int) -> tuple[Tensor, Tensor]:
    """``(counts (n_blocks,), pairs (T * top_k,))``: how many (token, slot) pairs chose each
    block, and the pairs ``p = t * top_k + j`` in block order (a stable sort, int64). Raises
    ValueError for an index outside ``[0, n_blocks)``."""
    flat = indices.reshape(-1).long()
    counts = torch.bincount(flat, minlength=n_blocks)
    if counts.numel() != n_blocks or (flat.numel() and int(flat.min()) < 0):
        raise ValueError(f"indices must lie in [0, {n_blocks}); got values outside it")
    return counts, torch.argsort(flat, stable=True)


class _Routing:
    """The (token, slot) pairs grouped by block: pair ``p = t * top_k + j`` in block order."""

    def __init__(self, indices: Tensor, n_blocks: int):
        top_k = indices.shape[1]
        counts, self.pairs = _sort_pairs(indices, n_blocks)  # pairs: [T * top_k], int64
        self.tokens = self.pairs // top_k
        ends = counts.cumsum(0).tolist()  # the CPU path loops over blocks on the host anyway
        starts = [0] + ends[:-1]
        spans = enumerate(zip(starts, ends, strict=True))
        self.spans = [(b, s, e) for b, (s, e) in spans if e > s]


def route_numel(T: int, top_k: int, n_blocks: int, deterministic: bool) -> int:
    """The torch path keeps no routing for the backward (it sorts again: one argsort)."""
    return 0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_ffn_fwd(
    x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None, *,
    block_size: int, activation: str, save_for_backward: bool, deterministic: bool,
    gate_keys: Tensor | None = None, gate_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """y (T, d_model) in x's dtype, the selected pre-activations (T*top_k, g) in block order
    when ``save_for_backward`` (else an empty tensor), and an empty route (see
    :func:`route_numel`). Bitwise repeatable run to run whatever ``deterministic`` says (the
    protocol's flag; the CPU kernel is repeatable for a given thread count, the torch ops
    always). With ``gate_keys`` the gated FFN (:func:`gated_block_ffn_fwd`)."""
    del deterministic
    kernel = _cpu_kernel(x2d)
    if gate_keys is not None:  # the CPU kernel's gated variant, else the chunked torch ops
        if kernel is not None:
            y, saved = kernel.block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias,
                                            gates, block_size=block_size, activation=activation,
                                            save_for_backward=save_for_backward,
                                            gate_keys=gate_keys, gate_bias=gate_bias)
            return y, saved, indices.new_empty(0)
        return gated_block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates,
                                   block_size=block_size, activation=activation,
                                   save_for_backward=save_for_backward, gate_keys=gate_keys,
                                   gate_bias=gate_bias)
    if kernel is not None:
        y, saved = kernel.block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates,
                                        block_size=block_size, activation=activation,
                                        save_for_backward=save_for_backward)
        return y, saved, indices.new_empty(0)
    if not save_for_backward and x2d.shape[0] <= FEW_TOKENS and x2d.device.type == "cpu":
        y = few_token_fwd(x2d, keys, values, indices, key_bias, out_bias, gates,
                          block_size=block_size, activation=activation)
        return y, x2d.new_empty(0), indices.new_empty(0)
    return grouped_block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates,
                                 block_size=block_size, activation=activation,
                                 save_for_backward=save_for_backward)


def avgk_ffn_fwd(
    x2d: Tensor, kbar: Tensor, bbar: Tensor | None, keys: Tensor, values: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, *, top_k: int, block_size: int,
    activation: str, gate_keys: Tensor | None = None, gate_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Inference: ``(y (T, d_model), indices int32 (T, top_k))``, :func:`select_blocks` then
    :func:`block_ffn_fwd` without gates and saving nothing. The CPU kernel does both in one
    call (float64 selects on torch ops, as in :func:`select_blocks`)."""
    kernel = _cpu_kernel(x2d)
    if kernel is not None and x2d.dtype != torch.float64 and kbar.dtype != torch.float64:
        return kernel.avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias,
                                   top_k=top_k, block_size=block_size, activation=activation,
                                   gate_keys=gate_keys, gate_bias=gate_bias)
    indices = select_blocks(x2d, kbar, bbar, top_k)
    y, _, _ = block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, None,
                            block_size=block_size, activation=activation,
                            save_for_backward=False, deterministic=False, gate_keys=gate_keys,
                            gate_bias=gate_bias)
    return y, indices


def few_token_fwd(
    x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None, *,
    block_size: int, activation: str,
) -> Tensor:
    """The forward for a few tokens (decoding), without the per-block loop: y (T, d_model).

    The distinct selected blocks are gathered, in groups whose copied key and value rows take
    at most :data:`FEW_TOKEN_GROUP_BYTES` (so they are read back from cache), and each group is
    two GEMMs for all T tokens, a token's blocks weighted by how often (with which summed gates)
    it chose them, 0 for the others. Blocks of :data:`FEW_TOKEN_GATHER_BELOW` bytes or more
    are used in place, one per group. For T = 1 this reads the selected blocks' bytes and
    little else, in three to six ops per group.
    """
    T, d_model = x2d.shape
    g = block_size
    n_blocks = keys.shape[0] // g
    acc = _acc_dtype(x2d.dtype)
    blocks, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    if blocks.numel() and (int(blocks[0]) < 0 or int(blocks[-1]) >= n_blocks):
        raise ValueError(f"indices must lie in [0, {n_blocks}); got values outside it")
    weight = torch.zeros(T, blocks.numel(), dtype=acc, device=x2d.device)  # [T, U]
    slot_w = torch.ones(indices.shape, dtype=acc, device=x2d.device) if gates is None \
        else gates.to(acc)
    weight.scatter_add_(1, inverse.view(T, -1), slot_w)
    # One token choosing distinct blocks without gates weighs each by 1: no product needed.
    weighted = T > 1 or gates is not None or blocks.numel() < indices.numel()
    # With several tokens a token's unchosen blocks are computed too: where(), not a product
    # with its 0 weight, keeps a NaN there (a NaN weight row) out of its output.
    chosen = None
    if T > 1:
        chosen = torch.zeros(T, blocks.numel(), dtype=torch.bool, device=x2d.device)
        chosen.scatter_(1, inverse.view(T, -1), True)
    y = torch.zeros(T, d_model, dtype=acc, device=x2d.device)
    if out_bias is not None:
        y += out_bias
    block_bytes = 2 * g * d_model * x2d.element_size()
    per_group = 1 if block_bytes >= FEW_TOKEN_GATHER_BELOW else \
        max(1, FEW_TOKEN_GROUP_BYTES // block_bytes)
    k3, v3 = keys.view(n_blocks, g, d_model), values.view(n_blocks, g, d_model)
    b2 = None if key_bias is None else key_bias.view(n_blocks, g)
    for u0 in range(0, blocks.numel(), per_group):
        ids = blocks[u0:u0 + per_group].long()
        if ids.numel() == 1:
            b = int(ids[0])
            kg, vg = k3[b], v3[b]
            bias = None if b2 is None else b2[b]
        else:
            kg = k3.index_select(0, ids).view(-1, d_model)  # [u * g, d_model]
            vg = v3.index_select(0, ids).view(-1, d_model)
            bias = None if b2 is None else b2.index_select(0, ids).view(-1)
        pre = x2d @ kg.t() if bias is None else torch.addmm(bias, x2d, kg.t())  # [T, u * g]
        h = apply_activation(pre, activation)
        if weighted:
            h = h * weight[:, u0:u0 + ids.numel()].repeat_interleave(g, dim=1).to(pre.dtype)
        if chosen is not None:
            mask = chosen[:, u0:u0 + ids.numel()].repeat_interleave(g, dim=1)
            h = torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
        if h.dtype == acc:
            y.addmm_(h, vg)
        else:
            y += (h @ vg).to(acc)
    return y.to(x2d.dtype)


def grouped_block_ffn_fwd(
    x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None, *,
    block_size: int, activation: str, save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`block_ffn_fwd` as a loop of ATen ops over the selected blocks."""
    T, d_model = x2d.shape
    g = block_size
    routing = _Routing(indices, keys.shape[0] // g)
    acc = _acc_dtype(x2d.dtype)
    y = torch.zeros(T, d_model, dtype=acc, device=x2d.device)
    if out_bias is not None:
        y += out_bias
    saved = x2d.new_empty(routing.pairs.numel(), g) if save_for_backward else x2d.new_empty(0)
    pair_gates = None if gates is None else gates.reshape(-1)[routing.pairs]
    for b, s, e in routing.spans:
        rows = slice(b * g, (b + 1) * g)
        tok = routing.tokens[s:e]
        xb = x2d.index_select(0, tok)  # [n, d_model]
        if key_bias is not None:
            pre = torch.addmm(key_bias[rows], xb, keys[rows].t())  # [n, g]
        else:
            pre = xb @ keys[rows].t()
        if save_for_backward:
            saved[s:e] = pre
        h = apply_activation(pre, activation)
        if pair_gates is not None:
            h = h * pair_gates[s:e, None].to(h.dtype)
        y.index_add_(0, tok, (h @ values[rows]).to(acc))
    return y.to(x2d.dtype), saved, indices.new_empty(0)


def block_ffn_bwd(
    dy: Tensor, x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, gates: Tensor | None, saved: Tensor, route: Tensor, *,
    block_size: int, activation: str, deterministic: bool, needs: tuple[bool, ...],
    gate_keys: Tensor | None = None, gate_bias: Tensor | None = None,
):
    """(dx, dkeys, dvalues, dkey_bias, dgates float32, dgate_keys, dgate_bias), each None when
    ``needs`` (one flag per output, :data:`sfnn.ops.GRAD_NAMES`; the plain FFN's first five are
    accepted alone) leaves it out; pre-activations come from ``saved`` when the forward kept
    them, else they are recomputed. Only the GEMMs of the needed gradients run. With
    ``gate_keys`` the gated FFN's (:func:`gated_block_ffn_bwd`)."""
    del route, deterministic  # repeatable either way, as the forward
    kernel = _cpu_kernel(x2d)
    if gate_keys is not None:
        needs7 = tuple(needs) + (False,) * (7 - len(needs))
        if kernel is not None:
            return kernel.block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved,
                                        block_size=block_size, activation=activation,
                                        needs=needs7, gate_keys=gate_keys,
                                        gate_bias=gate_bias)
        return gated_block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved,
                                   block_size=block_size, activation=activation, needs=needs7,
                                   gate_keys=gate_keys, gate_bias=gate_bias)
    plain_needs = tuple(needs[:5])
    if kernel is not None:
        grads = kernel.block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved,
                                     block_size=block_size, activation=activation,
                                     needs=plain_needs)
    else:
        grads = grouped_block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved,
                                      block_size=block_size, activation=activation,
                                      needs=plain_needs)
    return tuple(grads) + (None,) * (len(needs) - 5)


def grouped_block_ffn_bwd(
    dy: Tensor, x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, gates: Tensor | None, saved: Tensor, *,
    block_size: int, activation: str, needs: tuple[bool, ...],
):
    """:func:`block_ffn_bwd` as a loop of ATen ops over the selected blocks."""
    need_dx, need_dk, need_dv, need_dkb, need_dg = needs
    need_da = need_dx or need_dk or need_dkb
    T, d_model = x2d.shape
    g = block_size
    routing = _Routing(indices, keys.shape[0] // g)
    acc = _acc_dtype(x2d.dtype)
    dx = torch.zeros(T, d_model, dtype=acc, device=x2d.device) if need_dx else None
    dkeys = torch.zeros_like(keys) if need_dk else None
    dvalues = torch.zeros_like(values) if need_dv else None
    dkey_bias = torch.zeros_like(key_bias) if need_dkb else None
    dgates_pairs = None
    if need_dg:
        dgates_pairs = torch.zeros(routing.pairs.numel(), dtype=acc, device=x2d.device)
    pair_gates = None if gates is None else gates.reshape(-1)[routing.pairs]
    for b, s, e in routing.spans:
        rows = slice(b * g, (b + 1) * g)
        tok = routing.tokens[s:e]
        dyb = dy.index_select(0, tok)  # [n, d_model]
        xb = x2d.index_select(0, tok) if (need_dk or not saved.numel()) else None  # [n, d_model]
        if saved.numel():
            pre = saved[s:e]
        elif key_bias is not None:
            pre = torch.addmm(key_bias[rows], xb, keys[rows].t())
        else:
            pre = xb @ keys[rows].t()
        h = apply_activation(pre, activation) if (need_dv or need_dg) else None  # [n, g]
        dh = dyb @ values[rows].t() if (need_da or need_dg) else None  # [n, g], before the gate
        if pair_gates is not None:
            gate = pair_gates[s:e, None].to(pre.dtype)
            if need_dg:
                dgates_pairs[s:e] = (h * dh).sum(1, dtype=acc)
            h = None if h is None else h * gate
            dh = None if dh is None else dh * gate
        if need_dv:
            dvalues[rows] = h.t() @ dyb
        if not need_da:
            continue
        da = dh * activation_grad(pre, activation)
        if need_dk:
            dkeys[rows] = da.t() @ xb
        if need_dkb:
            dkey_bias[rows] = da.sum(0, dtype=acc)
        if need_dx:
            dx.index_add_(0, tok, (da @ keys[rows]).to(acc))
    dgates = None
    if dgates_pairs is not None:
        dgates = torch.empty_like(dgates_pairs)
        dgates[routing.pairs] = dgates_pairs
        dgates = dgates.view(T, -1)
    return (None if dx is None else dx.to(x2d.dtype)), dkeys, dvalues, dkey_bias, dgates


# --- gated FFNs (SwiGLU, GeGLU): h_i = act(x . kg_i + bg_i) * (x . ku_i + bu_i) --------------
#
# Batched over chunks, not looped over blocks: each block's (token, slot) pairs are cut into
# chunks of at most GATED_CHUNK rows, and every chunk is one batch entry of torch.bmm with its
# block's rows gathered alongside, so a call is ~20 large ops whatever the number of blocks.
# A per-block loop of small ops (as the plain FFN's pure-PyTorch path) pays an OpenMP fork/join
# per op: at the acceptance shape on a shared 2-core machine (load ~19) the loop ran at 0.1-0.2x
# the dense gated FFN and the chunked form at ~2x, side by side in one process.

# Rows per chunk (padding is at most GATED_CHUNK - 1 rows per selected block).
GATED_CHUNK = 256


class _Chunks:
    """The (token, slot) pairs grouped by block and cut into chunks of at most ``C`` rows.

    ``block`` (n_chunks,): each chunk's block; ``tok`` (n_chunks, C): its tokens, ``T`` (a zero
    row appended to x / dy) for padding; ``row`` (n_chunks, C): each slot's position in the
    block-sorted pair order, ``valid`` where it is a real pair; ``pairs`` the sort itself."""

    def __init__(self, indices: Tensor, n_blocks: int):
        T, top_k = indices.shape
        dev = indices.device
        counts, self.pairs = _sort_pairs(indices, n_blocks)  # pairs: [P]
        P = indices.numel()
        C = max(1, min(GATED_CHUNK, int(counts.max())))
        n_chunk = (counts + C - 1) // C  # chunks per block
        self.block = torch.repeat_interleave(torch.arange(n_blocks, device=dev), n_chunk)
        starts = counts.cumsum(0) - counts
        first = n_chunk.cumsum(0) - n_chunk
        j = torch.arange(self.block.numel(), device=dev) - first[self.block]
        self.row = starts[self.block, None] + j[:, None] * C + torch.arange(C, device=dev)
        self.valid = self.row < (starts + counts)[self.block, None]
        self.row = self.row.clamp_(max=P - 1)
        self.tok = torch.where(self.valid, (self.pairs // top_k)[self.row], T)
        self.T = T

    def gather_rows(self, t: Tensor) -> Tensor:
        """(n_chunks, C, d): the rows of ``t`` (T, d) per chunk slot, zeros for padding."""
        return torch.cat((t, t.new_zeros(1, t.shape[1])))[self.tok]

    def scatter_rows(self, out: Tensor, acc: torch.dtype) -> Tensor:
        """(T, d) in ``acc``: the sum over each token's chunk slots of ``out`` (n_chunks, C, d)."""
        d = out.shape[-1]
        y = torch.zeros(self.T + 1, d, dtype=acc, device=out.device)
        y.index_add_(0, self.tok.reshape(-1), out.reshape(-1, d).to(acc))
        return y[:self.T]

    def slot_weights(self, gates: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """(n_chunks, C, 1): each slot's gate (0 for padding), or None without gates."""
        if gates is None:
            return None
        pair_gates = gates.reshape(-1)[self.pairs]
        w = torch.where(self.valid, pair_gates[self.row], 0)
        return w.to(dtype).unsqueeze(-1)


def _gated_chunk_tables(keys, key_bias, gate_keys, gate_bias, chunks: _Chunks, g: int):
    """(n_chunks, 2g, d_model) ``[gate; up]`` rows of each chunk's block and the (n_chunks, 1,
    2g) bias (None when both biases are absent)."""
    nb, d = keys.shape[0] // g, keys.shape[1]
    blk = chunks.block
    w = torch.cat((gate_keys.view(nb, g, d)[blk], keys.view(nb, g, d)[blk]), 1)
    if key_bias is None and gate_bias is None:
        return w, None
    bg = gate_bias.view(nb, g)[blk] if gate_bias is not None else w.new_zeros(blk.numel(), g)
    bu = key_bias.view(nb, g)[blk] if key_bias is not None else w.new_zeros(blk.numel(), g)
    return w, torch.cat((bg, bu), 1).unsqueeze(1)


def gated_block_ffn_fwd(
    x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, out_bias: Tensor | None, gates: Tensor | None, *,
    block_size: int, activation: str, save_for_backward: bool, gate_keys: Tensor,
    gate_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gated block FFN, batched over chunks of each block's tokens (see :class:`_Chunks`).

    ``y_t = sum_j gates[t, j] * sum_{i in block indices[t, j]} act(x_t . kg_i + bg_i)
    * (x_t . ku_i + bu_i) v_i + out_bias``: ``keys``/``key_bias`` (d_ff, d_model)/(d_ff,) are
    the up table, ``gate_keys``/``gate_bias`` the gate table. One batched GEMM of the chunks'
    tokens with their block's ``[gate; up]`` rows (2g) gives both pre-activations, then
    ``act(A_gate) * A_up`` times the block's values. Returns y (T, d_model) in x's dtype,
    ``saved`` (T*top_k, 2g) = ``[A_gate | A_up]`` per (token, slot) pair in block order when
    ``save_for_backward`` (else empty), and an empty route. Differentiable torch ops only (the
    op layer's composite route differentiates it)."""
    g = block_size
    nb, d_model = keys.shape[0] // g, keys.shape[1]
    chunks = _Chunks(indices, nb)
    acc = _acc_dtype(x2d.dtype)
    xs = chunks.gather_rows(x2d)  # [n_chunks, C, d_model]
    w, bias = _gated_chunk_tables(keys, key_bias, gate_keys, gate_bias, chunks, g)
    pre = torch.bmm(xs, w.transpose(1, 2)) if bias is None else \
        torch.baddbmm(bias, xs, w.transpose(1, 2))  # [n_chunks, C, 2g]
    h = apply_activation(pre[..., :g], activation) * pre[..., g:]
    sw = chunks.slot_weights(gates, h.dtype)
    if sw is not None:
        h = h * sw
    out = torch.bmm(h, values.view(nb, g, d_model)[chunks.block])  # [n_chunks, C, d_model]
    y = chunks.scatter_rows(out, acc)
    if out_bias is not None:
        y = y + out_bias
    saved = x2d.new_empty(0)
    if save_for_backward:
        saved = x2d.new_empty(indices.numel(), 2 * g)
        saved[chunks.row[chunks.valid]] = pre[chunks.valid]
    return y.to(x2d.dtype), saved, indices.new_empty(0)


def gated_block_ffn_bwd(
    dy: Tensor, x2d: Tensor, keys: Tensor, values: Tensor, indices: Tensor,
    key_bias: Tensor | None, gates: Tensor | None, saved: Tensor, *,
    block_size: int, activation: str, needs: tuple[bool, ...], gate_keys: Tensor,
    gate_bias: Tensor | None = None,
):
    """The gated FFN's backward, batched over the same chunks: (dx, dkeys, dvalues, dkey_bias,
    dgates float32, dgate_keys, dgate_bias), each None unless ``needs`` (seven flags,
    :data:`sfnn.ops.GRAD_NAMES`) asks for it. ``saved`` is the forward's (T*top_k, 2g)
    ``[A_gate | A_up]`` or empty (then recomputed). With ``H = act(A_g) * A_u`` and
    ``dH = dy V_b^T`` (times the slot's gate): ``dA_u = dH * act(A_g)``,
    ``dA_g = dH * A_u * act'(A_g)``; only the GEMMs of the needed gradients run."""
    need_dx, need_dk, need_dv, need_dkb, need_dg, need_dgk, need_dgb = needs
    need_da = need_dx or need_dk or need_dkb or need_dgk or need_dgb
    g = block_size
    nb, d_model = keys.shape[0] // g, keys.shape[1]
    T = x2d.shape[0]
    chunks = _Chunks(indices, nb)
    acc = _acc_dtype(x2d.dtype)
    need_x = need_dk or need_dgk or not saved.numel()
    xs = chunks.gather_rows(x2d) if need_x else None  # [n_chunks, C, d_model]
    w = None
    if saved.numel():
        pre = saved.new_zeros(chunks.row.shape + (2 * g,))
        pre[chunks.valid] = saved[chunks.row[chunks.valid]]
    else:
        w, bias = _gated_chunk_tables(keys, key_bias, gate_keys, gate_bias, chunks, g)
        pre = torch.bmm(xs, w.transpose(1, 2)) if bias is None else \
            torch.baddbmm(bias, xs, w.transpose(1, 2))
    a_g, a_u = pre[..., :g], pre[..., g:]
    act_g = apply_activation(a_g, activation)
    dys = chunks.gather_rows(dy)  # [n_chunks, C, d_model]; zero rows for padding
    vs = values.view(nb, g, d_model)[chunks.block]  # [n_chunks, g, d_model]
    h = act_g * a_u if (need_dv or need_dg) else None
    dh = torch.bmm(dys, vs.transpose(1, 2)) if (need_da or need_dg) else None  # [n_ch, C, g]
    dgates = None
    sw = chunks.slot_weights(gates, pre.dtype)
    if sw is not None:
        if need_dg:
            per_slot = (h * dh).sum(-1, dtype=acc)  # [n_chunks, C]
            dgates_sorted = per_slot.new_zeros(indices.numel())
            dgates_sorted[chunks.row[chunks.valid]] = per_slot[chunks.valid]
            dgates = torch.empty_like(dgates_sorted)
            dgates[chunks.pairs] = dgates_sorted
            dgates = dgates.view(T, -1)
        h = None if h is None else h * sw
        dh = None if dh is None else dh * sw
    dvalues = dkeys = dgate_keys = dkey_bias = dgate_bias = dx = None
    if need_dv:
        dvalues = torch.zeros_like(values)
        dvalues.view(nb, g, d_model).index_add_(
            0, chunks.block, torch.bmm(h.transpose(1, 2), dys).to(values.dtype))
    if need_da:
        da = torch.cat((dh * a_u * activation_grad(a_g, activation), dh * act_g), -1)
        if need_dk or need_dgk:
            dw = torch.bmm(da.transpose(1, 2), xs)  # [n_chunks, 2g, d_model]
            if need_dgk:
                dgate_keys = torch.zeros_like(gate_keys)
                dgate_keys.view(nb, g, d_model).index_add_(0, chunks.block, dw[:, :g])
            if need_dk:
                dkeys = torch.zeros_like(keys)
                dkeys.view(nb, g, d_model).index_add_(0, chunks.block, dw[:, g:])
        if need_dkb or need_dgb:
            db = da.sum(1, dtype=acc)  # [n_chunks, 2g]
            if need_dgb:
                dgate_bias = torch.zeros(nb, g, dtype=acc, device=x2d.device)
                dgate_bias = dgate_bias.index_add_(0, chunks.block, db[:, :g])
                dgate_bias = dgate_bias.view(-1).to(gate_bias.dtype)
            if need_dkb:
                dkey_bias = torch.zeros(nb, g, dtype=acc, device=x2d.device)
                dkey_bias = dkey_bias.index_add_(0, chunks.block, db[:, g:])
                dkey_bias = dkey_bias.view(-1).to(key_bias.dtype)
        if need_dx:
            if w is None:
                w, _ = _gated_chunk_tables(keys, None, gate_keys, None, chunks, g)
            dx = chunks.scatter_rows(torch.bmm(da, w), acc).to(x2d.dtype)
    return dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys, dgate_bias
