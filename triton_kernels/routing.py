"""Routing of (token, slot) pairs to blocks, with no host synchronisation.

A pair ``p = t * top_k + j`` is token ``t``'s ``j``-th selected block ``indices[t, j]``. The
block-FFN kernels work on the pairs of one block at a time, so the pairs are sorted by a
*segment* key:

- ``by_slot=False``: segment = block (``n_blocks`` segments). Every pair of a block is in one
  contiguous run, so a block's weights are read once per tile of its pairs.
- ``by_slot=True``: segment = ``slot * n_blocks + block`` (``top_k * n_blocks`` segments). The
  pairs of one slot touch every token at most once, which lets the deterministic mode add the
  slots' partial outputs in a fixed order without atomics (see ``block_ffn.py``).

The sort and the offsets are torch ops on the device: one stable ``torch.sort`` of the int32
keys and one ``torch.searchsorted`` for the segment boundaries. Neither syncs with the host
(``torch.bincount`` is avoided on purpose: on CUDA it reads the maximum back to size its output).
The stable sort keeps the pairs of a segment in ascending pair order, so the order, and every sum
taken along it, is the same on every run.

The forward hands its routing to the backward packed in one int32 tensor (:meth:`Routing.pack`),
so the backward does not sort again.

The tile schedule (which segment and which rows a program works on) is not materialised: each
GEMM program finds its own tile with :func:`_find_tile`, a vectorised cumulative sum over the
segments' tile counts. That keeps the schedule independent of the tile height, so the autotuner
may vary ``BLOCK_T``, and the grid is sized by the upper bound
``cdiv(pairs, BLOCK_T) + n_segments``: programs past the last tile exit at once.
"""
from __future__ import annotations

import typing

import torch
import triton
import triton.language as tl


class Routing(typing.NamedTuple):
    """Pairs sorted by segment.

    order: int32 (P,), the pair ids ``t * top_k + j`` in segment order (P = T * top_k);
    seg_offsets: int32 (n_segments + 1,), segment ``s`` owns sorted rows
    ``[seg_offsets[s], seg_offsets[s + 1])``;
    n_blocks, top_k: ints; by_slot: whether segments are (slot, block) or block.
    """

    order: torch.Tensor
    seg_offsets: torch.Tensor
    n_blocks: int
    top_k: int
    by_slot: bool

    @property
    def n_segments(self) -> int:
        return self.n_blocks * (self.top_k if self.by_slot else 1)

    def counts(self) -> torch.Tensor:
        """int32 (n_segments,): the number of pairs of every segment."""
        return self.seg_offsets[1:] - self.seg_offsets[:-1]

    def pack(self) -> torch.Tensor:
        """One int32 tensor ``[order, seg_offsets]`` (the ``route`` the forward hands to the
        backward; its length is :func:`packed_numel`)."""
        return torch.cat([self.order, self.seg_offsets])

    @classmethod
    def unpack(cls, packed: torch.Tensor, T: int, top_k: int, n_blocks: int,
               by_slot: bool) -> Routing:
        """The inverse of :meth:`pack` (views, no copy)."""
        assert packed.numel() == packed_numel(T, top_k, n_blocks, by_slot), packed.shape
        P = T * top_k
        return cls(packed[:P], packed[P:], n_blocks, top_k, by_slot)


def packed_numel(T: int, top_k: int, n_blocks: int, by_slot: bool) -> int:
    """Length of :meth:`Routing.pack`: the pair order, then one offset per segment and one."""
    return T * top_k + n_blocks * (top_k if by_slot else 1) + 1


def route(indices: torch.Tensor, n_blocks: int, *, by_slot: bool = False) -> Routing:
    """Sort the (token, slot) pairs of ``indices`` (int32 (T, top_k), values in
    ``[0, n_blocks)``) by block, or by (slot, block) when ``by_slot``. No host sync.

    Example: ``route(torch.tensor([[2, 0], [0, 1]], dtype=torch.int32), 3)`` gives
    ``order = [1, 2, 3, 0]`` (pairs of block 0, then 1, then 2) and ``seg_offsets = [0, 2, 3, 4]``.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be (T, top_k), got shape {tuple(indices.shape)}")
    T, top_k = indices.shape
    if T * top_k >= 2**31:
        raise ValueError(f"T * top_k = {T * top_k} pairs exceed the int32 pair ids")
    key = indices.reshape(-1).to(torch.int32)
    n_segments = n_blocks
    if by_slot:
        slot = torch.arange(top_k, device=indices.device, dtype=torch.int32).repeat(T)
        key = slot * n_blocks + key
        n_segments = n_blocks * top_k
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_segments + 1, device=indices.device, dtype=torch.int32)
    seg_offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return Routing(order.to(torch.int32), seg_offsets, n_blocks, top_k, by_slot)


@triton.jit
def _find_tile(pid, seg_off_ptr, seg_base, n_seg, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    """Tile ``pid`` of the segments ``[seg_base, seg_base + n_seg)``, tiles of ``BLOCK_T`` rows.

    Tiles are numbered segment by segment (a segment of ``c`` rows has ``cdiv(c, BLOCK_T)``
    tiles; an empty one has none). Returns (segment relative to ``seg_base``, first row, end
    row of the segment, found); found is 0 when ``pid`` is past the last tile.
    """
    base = 0  # tiles of the segments before this chunk
    seg = 0
    row0 = 0
    row_end = 0
    found = 0
    for c0 in range(0, n_seg, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)  # [CHUNK]
        m = offs < n_seg
        start = tl.load(seg_off_ptr + seg_base + offs, mask=m, other=0)
        end = tl.load(seg_off_ptr + seg_base + offs + 1, mask=m, other=0)
        n_tiles = tl.where(m, (end - start + BLOCK_T - 1) // BLOCK_T, 0)
        incl = tl.cumsum(n_tiles, 0) + base
        excl = incl - n_tiles
        hit = (excl <= pid) & (pid < incl)
        seg += tl.sum(tl.where(hit, offs, 0), 0)
        row0 += tl.sum(tl.where(hit, start + (pid - excl) * BLOCK_T, 0), 0)
        row_end += tl.sum(tl.where(hit, end, 0), 0)
        found += tl.sum(hit.to(tl.int32), 0)
        base += tl.sum(n_tiles, 0)
    return seg, row0, row_end, found


def max_tiles(n_pairs: int, n_segments: int, block_t: int) -> int:
    """Upper bound on the tiles of ``n_pairs`` rows split over ``n_segments`` segments:
    ``sum_s cdiv(c_s, B) <= floor(P / B) + n_segments``. A host int from host ints only."""
    return n_pairs // block_t + n_segments
