"""Fused block-FFN forward and backward over given block indices (Triton).

``y_t = sum_j gate[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i + out_bias``

Work is split into tiles: ``BLOCK_T`` (token, slot) pairs of one block. The pairs
``p = t * top_k + j`` are sorted by block on the device (``routing.py``); a program finds its
tile itself, gathers its tokens' rows straight from the index (no padded copy; only the last tile
of a block is partial, and masked). ``G`` is the block size rounded up to a power of two >= 16
(extra cells masked), so any block size 1..256 works. The pre-activation
``A = X_b K_b^T + b_b`` (``[BLOCK_T, G]``, "A" everywhere below) is stored per *sorted row* (row
``r`` of the routing, so a tile's rows are contiguous) when the backward needs it.

The combine (summing each token's ``top_k`` partial outputs, ``T * top_k * d_model`` fp32 adds):

- atomic (``deterministic=False``, ``top_k > 1``): every program adds its fp32 partial rows into
  one fp32 ``(T, d_model)`` accumulator with ``atomic_add`` (a fresh buffer initialised with
  ``out_bias``); 16-bit outputs are cast from it at the end, fp32 outputs are the buffer. Each add
  is a read-modify-write of 8 bytes, resolved in L2 when the row is there, else through HBM.
- by slot (``deterministic=True``, and always when ``top_k == 1``): the pairs are sorted by
  (slot, block) and the kernels run once per slot; within a slot every token occurs once, so
  slot 0 stores its partial, the middle slots load, add and store, and the last slot adds
  ``out_bias`` and writes the output in its dtype. Bitwise repeatable, no float atomics.

The *schedule* decides whether the atomic combine stays in L2 (``schedule=`` on the launchers,
else the ``SFNN_COMBINE`` environment variable, else the cost model per shape, ``_model.py``):

- ``"tile"``: one fused kernel per tile: ``H = act(A)`` on chip, then ``H V_b`` chunk by chunk
  over all of d_model. The accumulator's rows are hit in block-major order, at random: at
  T = 16k, d_model = 4096 it is 268 MB, far past L2, so most adds reach HBM.
- ``"slice"``: d_model is cut into slices (``T * slice * 4`` bytes of accumulator, sized to L2)
  and the grid runs the slices outermost (``program_id(1)``), the block-major tiles inside; a
  first kernel stores A, and the output kernel re-reads its tile of A once per slice (``2 * g``
  bytes per pair per slice) instead of recomputing ``X K^T``. dx is scheduled the same way.

Backward (``needs`` skips what is not asked for):

- ``_block_ffn_dh_kernel`` per tile: ``dH = dY V_b^T`` (dY rows gathered once per tile when the
  tile holds all G cells), ``dgate = rowsum(H * dH)``, ``dA = gate * dH * act'(A)``,
  ``gH = gate * H``, stored per sorted row in x's dtype; by slot, one launch covers every slot
  (``program_id(1)``), each program scanning only its slot's segments.
- ``_block_ffn_dx_kernel`` per (tile, slice): ``dX = dA K_b``, the dA tile loaded once and kept on
  chip across the d_model loop, combined like y.
- ``_block_ffn_dw_kernel`` (groupXtY): one program per (d_model chunk, cell chunk, block), the
  d_model chunk fastest in the grid so that the programs sharing a block's dA rows run together
  and read them from L2; it forms ``dK_b^T = X^T dA`` (or ``dV_b^T = dY^T gH``) over the block's
  rows in sorted order, slot by slot (the same sums every run), and ``dkey_bias`` in the
  d-chunk-0 programs only. No atomics; blocks nobody chose get zeros.

Recompute or store: storing A costs ``2 * g`` bytes per pair (bf16) where recomputing it costs
``2 * d_model * g`` FLOPs and re-reads the keys; when ``saved`` is empty the backward recomputes.

fp32 inputs under matmul precision "highest" (true fp32 products) have no tensor-core path:
``tl.dot`` runs on the FMA units with small tiles (the "fma" configs of ``_configs.py``).

Host side: no ``.item()``/``.cpu()``/``.tolist()``; grids are sized from host ints only
(:func:`~.routing.max_tiles`), so the launchers are CUDA-graph and torch.compile friendly.
Index arithmetic: pair ids, sorted rows, tokens and cells are int32 (they are < 2**31, checked by
``route``); every offset that multiplies a stride or the block size is int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _configs, _model
from ._common import autotune, dot, dot_kind, dot_precision, on_tensor_device, unwrap
from .routing import Routing, _find_tile, max_tiles, packed_numel
from .routing import route as sort_pairs

_SCHED_CHUNK = 256
MAX_BLOCK_SIZE = 256
SCHEDULES = ("tile", "slice")
# Chooses the combine schedule when a launcher is not told: "tile", "slice" or "auto" (default:
# the cost model decides per shape).
SCHEDULE_ENV = "SFNN_COMBINE"


def _tuned(kernel: str, restore_value=()):
    """Autotuned over ``_configs.configs(kernel)``; the prune step keeps the configs of the
    launch's dot kind that fit its block size (:func:`_configs.launch_configs`)."""

    def prune(configs, named_args, **kwargs):
        G = kwargs["G"]
        x = next(v for k, v in named_args.items() if k.endswith("_ptr") and hasattr(v, "dtype"))
        dot_k = dot_kind(x.dtype, kwargs["DOT_PREC"])
        keep = {id(c) for c in _configs.launch_configs(kernel, dot_k, G, x.element_size(),
                                                        kwargs.get("LOAD_A", True))}
        return [c for c in configs if id(c) in keep]

    return autotune(_configs.configs(kernel), prune=prune, restore_value=restore_value)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == "relu":
        h = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (torch.relu)
    elif ACT == "gelu":
        h = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    else:
        h = a * tl.sigmoid(a)
    return h


@triton.jit
def _act_grad(a, ACT: tl.constexpr):
    if ACT == "relu":
        d = tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        d = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    else:
        s = tl.sigmoid(a)
        d = s * (1.0 + a * (1.0 - s))
    return d


@triton.jit
def _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr, top_k, BLOCK_T: tl.constexpr,
          CHUNK: tl.constexpr):
    """Tile ``i_t`` of the segments ``[seg_base, seg_base + n_blocks)``: (block, sorted rows
    int32 [BLOCK_T], row mask, pair ids int32, tokens int64, found)."""
    i_b, row0, row_end, found = _find_tile(i_t, seg_off_ptr, seg_base, n_blocks, BLOCK_T, CHUNK)
    o_r = row0 + tl.arange(0, BLOCK_T)  # [BLOCK_T] int32
    m_r = o_r < row_end
    pair = tl.load(order_ptr + o_r, mask=m_r, other=0)  # [BLOCK_T] int32
    tok = (pair // top_k).to(tl.int64)
    return i_b, o_r, m_r, pair, tok, found


@triton.jit
def _gather_dot(src_ptr, tok, m_r, table_ptr, cells, m_c, d_model, stride_src, stride_table,
                DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                NC: tl.constexpr):
    """``src[tok] @ table[cells]^T`` in fp32, [BLOCK_T, NC]: gathered rows of a (T, d_model)
    activation against rows of a (d_ff, d_model) table (x and keys for A, dy and values for dH)."""
    b_acc = tl.zeros([BLOCK_T, NC], dtype=tl.float32)
    p_src = src_ptr + tok[:, None] * stride_src  # [BLOCK_T, 1]
    p_tab = table_ptr + cells.to(tl.int64)[None, :] * stride_table  # [1, NC]
    for k0 in range(0, d_model, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < d_model
        b_s = tl.load(p_src + o_k[None, :], mask=m_r[:, None] & m_k[None, :],
                      other=0.0)  # [BLOCK_T, BLOCK_K]
        b_w = tl.load(p_tab + o_k[:, None], mask=m_c[None, :] & m_k[:, None],
                      other=0.0)  # [BLOCK_K, NC]
        b_acc = dot(b_s, b_w, b_acc, DOT_PREC)
    return b_acc


@triton.jit
def _combine(b_out, tok, m_r, o_d, m_d, acc_ptr, out_ptr, ob_ptr, d_model, stride_out,
             HAS_OB: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr,
             LAST: tl.constexpr):
    """Adds fp32 partial rows [BLOCK_T, BLOCK_D] into the token rows (see the combine)."""
    m = m_r[:, None] & m_d[None, :]
    p_acc = acc_ptr + tok[:, None] * d_model + o_d[None, :]
    if ATOMIC:
        tl.atomic_add(p_acc, b_out, mask=m, sem="relaxed")
    else:
        if not FIRST:
            b_out += tl.load(p_acc, mask=m, other=0.0)
        if LAST:
            if HAS_OB:
                b_out += tl.load(ob_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            p_out = out_ptr + tok[:, None] * stride_out + o_d[None, :]
            tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(p_acc, b_out, mask=m)


@triton.jit
def _rows_times_table(b_lhs, cells, m_c, table_ptr, stride_table, tok, m_r, acc_ptr, out_ptr,
                      ob_ptr, i_s, slice_d, d_model, stride_out,
                      DOT_PREC: tl.constexpr, HAS_OB: tl.constexpr, ATOMIC: tl.constexpr,
                      FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """``b_lhs [BLOCK_T, G] @ table[cells, slice]`` chunk by chunk over the d_model slice
    ``i_s`` (columns ``[i_s * slice_d, (i_s + 1) * slice_d)``), each chunk combined into the
    token rows: ``H V`` for y, ``dA K`` for dx."""
    d_lo = i_s * slice_d
    d_hi = tl.minimum(d_lo + slice_d, d_model)
    p_tab = table_ptr + cells.to(tl.int64)[:, None] * stride_table  # [G, 1]
    for d0 in range(d_lo, d_hi, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < d_hi
        b_w = tl.load(p_tab + o_d[None, :], mask=m_c[:, None] & m_d[None, :],
                      other=0.0)  # [G, BLOCK_D]
        b_out = dot(b_lhs, b_w, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), DOT_PREC)
        _combine(b_out, tok, m_r, o_d, m_d, acc_ptr, out_ptr, ob_ptr, d_model, stride_out,
                 HAS_OB, ATOMIC, FIRST, LAST)


@_tuned("fwd", restore_value=("acc_ptr", "y_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _block_ffn_fwd_kernel(
    x_ptr, keys_ptr, values_ptr, kb_ptr, gates_ptr, ob_ptr, order_ptr, seg_off_ptr, a_ptr,
    acc_ptr, y_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_x, stride_k, stride_v, stride_y,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_KB: tl.constexpr,
    HAS_OB: tl.constexpr, HAS_GATES: tl.constexpr, SAVE_A: tl.constexpr, ATOMIC: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fused forward of one (tile, d_model slice): ``A = X K^T + b`` (stored when SAVE_A),
    ``H = gate * act(A)`` on chip, then ``H V`` over the slice, combined into y."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c  # [G] int32
    b_a = _gather_dot(x_ptr, tok, m_r, keys_ptr, cells, m_c, d_model, stride_x, stride_k,
                      DOT_PREC, BLOCK_T, BLOCK_K, G)  # [BLOCK_T, G]
    if HAS_KB:
        b_a += tl.load(kb_ptr + cells, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if SAVE_A:
        tl.store(a_ptr + o_r.to(tl.int64)[:, None] * BS + o_c[None, :],
                 b_a.to(a_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])
    b_h = tl.where(m_c[None, :], _act(b_a, ACT), 0.0)
    if HAS_GATES:
        b_h *= tl.load(gates_ptr + pair, mask=m_r, other=0.0)[:, None]
    _rows_times_table(b_h.to(values_ptr.dtype.element_ty), cells, m_c, values_ptr, stride_v, tok,
                      m_r, acc_ptr, y_ptr, ob_ptr, i_s, slice_d, d_model, stride_y, DOT_PREC,
                      HAS_OB, ATOMIC, FIRST, LAST, BLOCK_T, BLOCK_D)


@_tuned("pre")
@triton.jit
def _block_ffn_pre_kernel(
    x_ptr, keys_ptr, kb_ptr, order_ptr, seg_off_ptr, a_ptr,
    d_model, top_k, n_blocks,
    stride_x, stride_k,
    BS: tl.constexpr, G: tl.constexpr, HAS_KB: tl.constexpr, DOT_PREC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pre-activation of one tile, ``A = X K^T + b``, stored per sorted row (slice schedule;
    by slot, ``program_id(1)`` is the slot)."""
    i_t = tl.program_id(0)
    seg_base = tl.program_id(1) * n_blocks
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    b_a = _gather_dot(x_ptr, tok, m_r, keys_ptr, cells, m_c, d_model, stride_x, stride_k,
                      DOT_PREC, BLOCK_T, BLOCK_K, G)
    if HAS_KB:
        b_a += tl.load(kb_ptr + cells, mask=m_c, other=0.0).to(tl.float32)[None, :]
    tl.store(a_ptr + o_r.to(tl.int64)[:, None] * BS + o_c[None, :],
             b_a.to(a_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


@_tuned("out", restore_value=("acc_ptr", "y_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _block_ffn_out_kernel(
    values_ptr, gates_ptr, ob_ptr, order_ptr, seg_off_ptr, a_ptr, acc_ptr, y_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_v, stride_y,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_OB: tl.constexpr,
    HAS_GATES: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Output of one (tile, d_model slice) from the stored A: ``H = gate * act(A)``, ``H V``
    over the slice, combined into y (slice schedule: the slices run outermost)."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    b_a = tl.load(a_ptr + o_r.to(tl.int64)[:, None] * BS + o_c[None, :],
                  mask=m_r[:, None] & m_c[None, :], other=0.0).to(tl.float32)  # [BLOCK_T, G]
    b_h = tl.where(m_c[None, :], _act(b_a, ACT), 0.0)
    if HAS_GATES:
        b_h *= tl.load(gates_ptr + pair, mask=m_r, other=0.0)[:, None]
    _rows_times_table(b_h.to(values_ptr.dtype.element_ty), cells, m_c, values_ptr, stride_v, tok,
                      m_r, acc_ptr, y_ptr, ob_ptr, i_s, slice_d, d_model, stride_y, DOT_PREC,
                      HAS_OB, ATOMIC, FIRST, LAST, BLOCK_T, BLOCK_D)


@_tuned("dh")
@triton.jit
def _block_ffn_dh_kernel(
    x_ptr, keys_ptr, values_ptr, kb_ptr, gates_ptr, dy_ptr, a_ptr, order_ptr, seg_off_ptr,
    da_ptr, gh_ptr, dgates_ptr,
    d_model, top_k, n_blocks,
    stride_x, stride_k, stride_v, stride_dy,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_KB: tl.constexpr,
    HAS_GATES: tl.constexpr, LOAD_A: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_DGATES: tl.constexpr, DOT_PREC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per tile, BLOCK_G cells at a time: ``dH = dY V^T``, ``dgate = rowsum(H * dH)``,
    ``dA = gate * dH * act'(A)``, ``gH = gate * H``; dA and gH stored per sorted row, each only
    when needed (by slot, ``program_id(1)`` is the slot)."""
    i_t = tl.program_id(0)
    seg_base = tl.program_id(1) * n_blocks
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    p_rows = o_r.to(tl.int64)[:, None] * BS  # [BLOCK_T, 1]
    if HAS_GATES:
        b_gate = tl.load(gates_ptr + pair, mask=m_r, other=0.0)  # [BLOCK_T] fp32
        b_dgate = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, BS, BLOCK_G):
        o_c = c0 + tl.arange(0, BLOCK_G)
        m_c = o_c < BS
        cells = i_b * BS + o_c  # [BLOCK_G]
        m_rc = m_r[:, None] & m_c[None, :]
        if NEED_DA or NEED_DGATES:
            b_dh = _gather_dot(dy_ptr, tok, m_r, values_ptr, cells, m_c, d_model, stride_dy,
                               stride_v, DOT_PREC, BLOCK_T, BLOCK_K, BLOCK_G)
        if LOAD_A:
            b_a = tl.load(a_ptr + p_rows + o_c[None, :], mask=m_rc, other=0.0).to(tl.float32)
        else:
            b_a = _gather_dot(x_ptr, tok, m_r, keys_ptr, cells, m_c, d_model, stride_x,
                              stride_k, DOT_PREC, BLOCK_T, BLOCK_K, BLOCK_G)
            if HAS_KB:
                b_a += tl.load(kb_ptr + cells, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if NEED_GH or NEED_DGATES:
            b_h = tl.where(m_c[None, :], _act(b_a, ACT), 0.0)
            if NEED_DGATES:
                b_dgate += tl.sum(b_h * b_dh, 1)
            if NEED_GH:
                if HAS_GATES:
                    b_h *= b_gate[:, None]
                tl.store(gh_ptr + p_rows + o_c[None, :], b_h.to(gh_ptr.dtype.element_ty),
                         mask=m_rc)
        if NEED_DA:
            if HAS_GATES:
                b_dh *= b_gate[:, None]
            b_da = tl.where(m_c[None, :], b_dh * _act_grad(b_a, ACT), 0.0)
            tl.store(da_ptr + p_rows + o_c[None, :], b_da.to(da_ptr.dtype.element_ty),
                     mask=m_rc)
    if NEED_DGATES:
        tl.store(dgates_ptr + pair, b_dgate, mask=m_r)


@_tuned("dx", restore_value=("acc_ptr", "dx_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _block_ffn_dx_kernel(
    keys_ptr, order_ptr, seg_off_ptr, da_ptr, acc_ptr, dx_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_k, stride_dx,
    BS: tl.constexpr, G: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (tile, d_model slice): ``dX rows = dA K_b`` over the slice, the dA tile loaded once,
    combined like y."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    b_da = tl.load(da_ptr + o_r.to(tl.int64)[:, None] * BS + o_c[None, :],
                   mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BLOCK_T, G]
    _rows_times_table(b_da, cells, m_c, keys_ptr, stride_k, tok, m_r, acc_ptr, dx_ptr, dx_ptr,
                      i_s, slice_d, d_model, stride_dx, DOT_PREC, False, ATOMIC, FIRST, LAST,
                      BLOCK_T, BLOCK_D)


@_tuned("dw")
@triton.jit
def _block_ffn_dw_kernel(
    src_ptr, buf_ptr, order_ptr, seg_off_ptr, dw_ptr, db_ptr,
    d_model, top_k, n_blocks, n_slots,
    stride_src, stride_dw,
    BS: tl.constexpr, G: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """groupXtY: ``dw[block b cells, chunk]^T = sum over b's rows src[tok(row), chunk]^T
    buf[row]`` (src = x, buf = dA for dkeys; src = dy, buf = gate * H for dvalues); with HAS_DB
    the d-chunk-0 programs also write ``db[b] = colsum(buf)``. Grid: (d_model chunk, cell
    chunk, block), the d_model chunk fastest."""
    i_d = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] int32
    m_d = o_d < d_model
    o_c = i_c * BLOCK_G + tl.arange(0, BLOCK_G)
    m_c = o_c < BS
    b_acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_G], dtype=tl.float32)
    first_chunk = i_d == 0  # the bias sum is done once, by the d-chunk-0 programs
    for j in range(0, n_slots):
        seg = j * n_blocks + i_b
        start = tl.load(seg_off_ptr + seg)
        end = tl.load(seg_off_ptr + seg + 1)
        for r0 in range(start, end, BLOCK_T):
            o_r = r0 + tl.arange(0, BLOCK_T)  # [BLOCK_T] int32
            m_r = o_r < end
            tok = (tl.load(order_ptr + o_r, mask=m_r, other=0) // top_k).to(tl.int64)
            b_buf = tl.load(buf_ptr + o_r.to(tl.int64)[:, None] * BS + o_c[None, :],
                            mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BLOCK_T, BLOCK_G]
            if HAS_DW:
                b_srct = tl.load(src_ptr + tok[None, :] * stride_src + o_d[:, None],
                                 mask=m_r[None, :] & m_d[:, None],
                                 other=0.0)  # [BLOCK_D, BLOCK_T]
                b_acc = dot(b_srct, b_buf, b_acc, DOT_PREC)
            if HAS_DB:
                if first_chunk:
                    b_db += tl.sum(b_buf.to(tl.float32), 0)
    cells = (i_b * BS + o_c).to(tl.int64)
    if HAS_DW:
        tl.store(dw_ptr + cells[None, :] * stride_dw + o_d[:, None],
                 b_acc.to(dw_ptr.dtype.element_ty), mask=m_c[None, :] & m_d[:, None])
    if HAS_DB:
        if first_chunk:
            tl.store(db_ptr + cells, b_db.to(db_ptr.dtype.element_ty), mask=m_c)


def padded_block(block_size: int) -> int:
    """G: the block size rounded up to a power of two >= 16 (``tl.dot`` needs >= 16)."""
    return max(16, triton.next_power_of_2(block_size))


def route_numel(T: int, top_k: int, n_blocks: int, deterministic: bool) -> int:
    """Length of the ``route`` the forward returns when saving for the backward: the pair order
    and the segment offsets (:meth:`Routing.pack`)."""
    return packed_numel(T, top_k, n_blocks, _by_slot(deterministic, top_k))


def _by_slot(deterministic: bool, top_k: int) -> bool:
    return deterministic or top_k == 1


def resolve_schedule(schedule: str | None, T: int, d_model: int, d_ff: int, block_size: int,
                     top_k: int, elem: int, by_slot: bool, device: torch.device,
                     slice_d: int | None = None) -> tuple[str, int]:
    """(schedule, slice width in columns) of a launch: ``schedule`` if given, else
    ``$SFNN_COMBINE``, else ("auto") the cost model's choice for this shape (``_model.py``).
    The slice width is ``slice_d`` when given (a multiple of the widest BLOCK_D), else the
    widest whose fp32 accumulator slice fits the live part of L2."""
    schedule = schedule or os.environ.get(SCHEDULE_ENV, "auto")
    if schedule not in SCHEDULES + ("auto",):
        raise ValueError(f"combine schedule must be one of {SCHEDULES + ('auto',)} (argument or "
                         f"${SCHEDULE_ENV}), got {schedule!r}")
    l2 = _model.device_l2_bytes(device)
    step = _configs.max_block_d()
    if schedule == "auto":
        schedule = _model.choose_schedule(T, d_model, d_ff, block_size, top_k, elem, by_slot,
                                          l2, step)
    if schedule == "tile":
        return "tile", d_model
    if slice_d is None:
        return "slice", _model.slice_width(T, d_model, l2, step)
    if slice_d <= 0 or slice_d % step:
        raise ValueError(f"slice_d must be a positive multiple of {step}, got {slice_d}")
    return "slice", slice_d


def _launch(kernel, kind: str, grid, args, consts: dict, deterministic: bool,
            gated: bool = False):
    """Launch ``kernel``: autotuned, or in deterministic mode with its one fixed config
    (:func:`_configs.fixed_config`; ``gated``: of the gated kernels, ``gated_ffn.py``), so that
    results never depend on which config won a timing race in this process."""
    if not deterministic:
        kernel[grid](*args, **consts)
        return
    first = next(a for a in args if isinstance(a, torch.Tensor))
    cfg = _configs.fixed_config(kind, dot_kind(first.dtype, consts["DOT_PREC"]),
                                consts.get("BLOCK_C", consts.get("G")),
                                first.element_size(), consts.get("LOAD_A", True),
                                gated=gated and kind != "dw")
    unwrap(kernel)[grid](*args, **consts, **cfg.kwargs, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)


def _assert_inputs(x2d, keys, values, indices, key_bias, gates, block_size, activation):
    """The op layer validated the inputs (``sfnn.functional``); these only guard misuse."""
    T, d_model = x2d.shape
    assert keys.shape == values.shape and keys.shape[1] == d_model, (keys.shape, x2d.shape)
    assert keys.dtype == values.dtype == x2d.dtype, (x2d.dtype, keys.dtype, values.dtype)
    assert 1 <= block_size <= MAX_BLOCK_SIZE and keys.shape[0] % block_size == 0, block_size
    assert indices.dtype == torch.int32 and indices.shape[0] == T, indices.shape
    assert gates is None or (gates.dtype == torch.float32 and gates.shape == indices.shape)
    assert key_bias is None or key_bias.shape == (keys.shape[0],)
    assert activation in ("relu", "gelu", "silu"), activation
    assert all(t.is_contiguous() for t in (x2d, keys, values, indices))


def _contig(t):
    return None if t is None else t.contiguous()


@on_tensor_device
def block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size,
                  activation, save_for_backward, deterministic, schedule=None, slice_d=None,
                  gate_keys=None, gate_bias=None):
    """Block FFN forward over ``indices``: the plain FFN (:func:`plain_ffn_fwd`), or the gated
    one when ``gate_keys`` is given (``gated_ffn.gated_ffn_fwd``; gate_bias only with it)."""
    if gate_keys is None:
        assert gate_bias is None, "gate_bias without gate_keys"
        return plain_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates,
                             block_size=block_size, activation=activation,
                             save_for_backward=save_for_backward, deterministic=deterministic,
                             schedule=schedule, slice_d=slice_d)
    from .gated_ffn import gated_ffn_fwd

    return gated_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, gate_keys,
                         gate_bias, block_size=block_size, activation=activation,
                         save_for_backward=save_for_backward, deterministic=deterministic,
                         schedule=schedule, slice_d=slice_d)


@on_tensor_device
def block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route=None, *,
                  block_size, activation, deterministic, needs=(True,) * 5, schedule=None,
                  slice_d=None, gate_keys=None, gate_bias=None):
    """Block FFN backward: the plain FFN's (:func:`plain_ffn_bwd`) or, when ``gate_keys`` is
    given, the gated one's (``gated_ffn.gated_ffn_bwd``). Returns one gradient per flag of
    ``needs`` (``sfnn.ops.GRAD_NAMES`` order): 5 (x, keys, values, key_bias, gates) or 7 (also
    gate_keys, gate_bias; None for a plain FFN)."""
    assert len(needs) in (5, 7), needs
    if gate_keys is None:
        assert gate_bias is None, "gate_bias without gate_keys"
        grads = plain_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route,
                              block_size=block_size, activation=activation,
                              deterministic=deterministic, needs=tuple(needs[:5]),
                              schedule=schedule, slice_d=slice_d)
        return grads + (None,) * (len(needs) - 5)
    assert len(needs) == 7, "a gated backward returns 7 gradients: needs has 7 flags"
    from .gated_ffn import gated_ffn_bwd

    return gated_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route,
                         gate_keys, gate_bias, block_size=block_size, activation=activation,
                         deterministic=deterministic, needs=needs, schedule=schedule,
                         slice_d=slice_d)


@on_tensor_device
def plain_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size,
                  activation, save_for_backward, deterministic, schedule=None, slice_d=None):
    """Block FFN forward over ``indices`` (the plain, ungated FFN).

    x2d: (T, d) fp32/fp16/bf16, T >= 1; keys, values: (d_ff, d) same dtype; indices: int32
    (T, top_k); key_bias (d_ff,) / out_bias (d,) / gates float32 (T, top_k) or None.
    ``schedule``: "tile", "slice" or None (``$SFNN_COMBINE``, else the cost model); ``slice_d``:
    the slice width (default: sized to L2).
    Returns ``(y (T, d) in x's dtype, saved, route)``: ``saved`` is the pre-activation
    ``(T * top_k, block_size)`` in x's dtype, per sorted row, and ``route`` the packed routing
    (int32, :func:`route_numel` long) when ``save_for_backward``, else empty tensors.

    Example::

        y, saved, route = block_ffn_fwd(x, keys, values, idx, None, None, None, block_size=64,
                                        activation="relu", save_for_backward=True,
                                        deterministic=False)
    """
    _assert_inputs(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    key_bias, gates, out_bias = _contig(key_bias), _contig(gates), _contig(out_bias)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype, dev = x2d.dtype, x2d.device
    by_slot = _by_slot(deterministic, top_k)
    schedule, slice_d = resolve_schedule(schedule, T, d_model, keys.shape[0], block_size, top_k,
                                         x2d.element_size(), by_slot, dev, slice_d)
    routing = sort_pairs(indices, n_blocks, by_slot=by_slot)
    sliced = schedule == "slice"
    keep_a = save_for_backward or sliced
    a = torch.empty((T * top_k, block_size), device=dev, dtype=dtype) if keep_a else x2d
    y = torch.empty_like(x2d)
    if by_slot:
        acc = y if dtype == torch.float32 or top_k == 1 else torch.empty(
            (T, d_model), device=dev, dtype=torch.float32)
    else:
        acc = y if dtype == torch.float32 else torch.empty((T, d_model), device=dev,
                                                           dtype=torch.float32)
        if out_bias is not None:  # a copy: the buffer must never alias out_bias (T == 1)
            acc.copy_(out_bias.to(torch.float32).expand(T, d_model))
        else:
            acc.zero_()
    dummy = x2d  # for pointers a variant does not read
    common = dict(BS=block_size, G=padded_block(block_size), DOT_PREC=dot_precision(dtype),
                  CHUNK=_SCHED_CHUNK)
    combine = dict(HAS_OB=out_bias is not None, HAS_GATES=gates is not None, ATOMIC=not by_slot)
    n_launch = top_k if by_slot else 1
    pairs = T if by_slot else T * top_k
    n_slices = triton.cdiv(d_model, slice_d)
    grid = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_slices)
    if sliced:
        grid_pre = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_launch)
        _launch(_block_ffn_pre_kernel, "pre", grid_pre,
                (x2d, keys, key_bias if key_bias is not None else dummy, routing.order,
                 routing.seg_offsets, a, d_model, top_k, n_blocks, x2d.stride(0), keys.stride(0)),
                dict(common, HAS_KB=key_bias is not None), deterministic)
    for j in range(n_launch):
        order = dict(FIRST=j == 0, LAST=j == n_launch - 1)
        if sliced:
            _launch(_block_ffn_out_kernel, "out", grid,
                    (values, gates if gates is not None else dummy,
                     out_bias if out_bias is not None else dummy, routing.order,
                     routing.seg_offsets, a, acc, y, d_model, top_k, n_blocks, j * n_blocks,
                     slice_d, values.stride(0), y.stride(0)),
                    dict(common, **combine, **order, ACT=activation), deterministic)
        else:
            _launch(_block_ffn_fwd_kernel, "fwd", grid,
                    (x2d, keys, values, key_bias if key_bias is not None else dummy,
                     gates if gates is not None else dummy,
                     out_bias if out_bias is not None else dummy, routing.order,
                     routing.seg_offsets, a, acc, y, d_model, top_k, n_blocks, j * n_blocks,
                     slice_d, x2d.stride(0), keys.stride(0), values.stride(0), y.stride(0)),
                    dict(common, **combine, **order, ACT=activation, HAS_KB=key_bias is not None,
                         SAVE_A=bool(save_for_backward)), deterministic)
    if not by_slot and acc is not y:
        y.copy_(acc)
    if not save_for_backward:
        return y, x2d.new_empty(0), indices.new_empty(0)
    return y, a, routing.pack()


@on_tensor_device
def plain_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route=None, *,
                  block_size, activation, deterministic, needs=(True,) * 5, schedule=None,
                  slice_d=None):
    """Block FFN backward (the plain FFN): ``(dx, dkeys, dvalues, dkey_bias, dgates float32)``,
    each None when not in ``needs`` (one flag per output, ``sfnn.ops.GRAD_NAMES`` order) or of
    an absent input; only the kernels the needed outputs depend on run.

    dy: (T, d) contiguous in x's dtype; ``saved`` and ``route`` are the forward's (empty: the
    pre-activation is recomputed / the pairs are sorted again). The gradient of ``out_bias`` is
    the caller's (``dy.sum(0)``). ``schedule``, ``slice_d`` as in :func:`block_ffn_fwd` (dx).
    """
    _assert_inputs(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    assert dy.shape == x2d.shape and dy.dtype == x2d.dtype and dy.is_contiguous()
    key_bias, gates = _contig(key_bias), _contig(gates)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype, dev = x2d.dtype, x2d.device
    need_dx, need_dk, need_dv, need_dkb, need_dg = (bool(n) for n in needs)
    need_dkb = need_dkb and key_bias is not None
    need_dg = need_dg and gates is not None
    need_da = need_dx or need_dk or need_dkb
    if not (need_da or need_dv or need_dg):
        return None, None, None, None, None
    load_a = saved.numel() > 0
    assert not load_a or saved.shape == (T * top_k, block_size), saved.shape
    by_slot = _by_slot(deterministic, top_k)
    if route is not None and route.numel():
        routing = Routing.unpack(route, T, top_k, n_blocks, by_slot)
    else:
        routing = sort_pairs(indices, n_blocks, by_slot=by_slot)
    dummy = x2d
    common = dict(BS=block_size, G=padded_block(block_size), DOT_PREC=dot_precision(dtype),
                  CHUNK=_SCHED_CHUNK)
    n_slots = top_k if by_slot else 1
    pairs = T if by_slot else T * top_k

    da = torch.empty((T * top_k, block_size), device=dev, dtype=dtype) if need_da else dummy
    gh = torch.empty((T * top_k, block_size), device=dev, dtype=dtype) if need_dv else dummy
    dgates = torch.empty((T, top_k), device=dev, dtype=torch.float32) if need_dg else None
    grid_h = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_slots)
    _launch(_block_ffn_dh_kernel, "dh", grid_h,
            (x2d, keys, values, key_bias if key_bias is not None else dummy,
             gates if gates is not None else dummy, dy, saved if load_a else dummy,
             routing.order, routing.seg_offsets, da, gh, dgates if need_dg else dummy,
             d_model, top_k, n_blocks, x2d.stride(0), keys.stride(0), values.stride(0),
             dy.stride(0)),
            dict(common, ACT=activation, HAS_KB=key_bias is not None, HAS_GATES=gates is not None,
                 LOAD_A=load_a, NEED_DA=need_da, NEED_GH=need_dv, NEED_DGATES=need_dg),
            deterministic)

    dx = None
    if need_dx:
        schedule, slice_d = resolve_schedule(schedule, T, d_model, keys.shape[0], block_size,
                                             top_k, x2d.element_size(), by_slot, dev, slice_d)
        dx = torch.empty_like(x2d)
        if by_slot:
            acc = dx if dtype == torch.float32 or top_k == 1 else torch.empty(
                (T, d_model), device=dev, dtype=torch.float32)
        else:
            acc = dx.zero_() if dtype == torch.float32 else torch.zeros(
                (T, d_model), device=dev, dtype=torch.float32)
        n_slices = triton.cdiv(d_model, slice_d)
        grid_x = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_slices)
        for j in range(n_slots):
            _launch(_block_ffn_dx_kernel, "dx", grid_x,
                    (keys, routing.order, routing.seg_offsets, da, acc, dx, d_model, top_k,
                     n_blocks, j * n_blocks, slice_d, keys.stride(0), dx.stride(0)),
                    dict(common, ATOMIC=not by_slot, FIRST=j == 0, LAST=j == n_slots - 1),
                    deterministic)
        if not by_slot and acc is not dx:
            dx.copy_(acc)

    dkeys = torch.empty_like(keys) if need_dk else None
    dkey_bias = torch.empty_like(key_bias) if need_dkb else None
    dvalues = torch.empty_like(values) if need_dv else None
    w_common = dict(BS=block_size, G=common["G"], DOT_PREC=common["DOT_PREC"])
    if need_dk or need_dkb:
        grid_k = lambda meta: (triton.cdiv(d_model, meta["BLOCK_D"]) if need_dk else 1,
                               triton.cdiv(block_size, meta["BLOCK_G"]), n_blocks)
        _launch(_block_ffn_dw_kernel, "dw", grid_k,
                (x2d, da, routing.order, routing.seg_offsets,
                 dkeys if need_dk else dummy, dkey_bias if need_dkb else dummy,
                 d_model, top_k, n_blocks, n_slots, x2d.stride(0), keys.stride(0)),
                dict(w_common, HAS_DW=need_dk, HAS_DB=need_dkb), deterministic)
    if need_dv:
        grid_v = lambda meta: (triton.cdiv(d_model, meta["BLOCK_D"]),
                               triton.cdiv(block_size, meta["BLOCK_G"]), n_blocks)
        _launch(_block_ffn_dw_kernel, "dw", grid_v,
                (dy, gh, routing.order, routing.seg_offsets, dvalues, dummy,
                 d_model, top_k, n_blocks, n_slots, dy.stride(0), values.stride(0)),
                dict(w_common, HAS_DW=True, HAS_DB=False), deterministic)
    return dx, dkeys, dvalues, dkey_bias, dgates

