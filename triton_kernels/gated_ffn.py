"""Gated block-FFN forward and backward (Triton): the gated FFN of the protocol (issue 11).

``h_i = act(x . kg_i + bg_i) * (x . ku_i + bu_i)``, ``y_t = sum_j gate[t, j] * sum_{i in block
indices[t, j]} h_i v_i + out_bias``: ``gate_keys`` / ``gate_bias`` (kg, bg) are the gate table
(the activation applies to it), ``keys`` / ``key_bias`` (ku, bu) the up table (linear), ``gates``
the selection methods' per-(token, slot) weights.

The work is split, routed and combined exactly as in ``block_ffn.py`` (same routing, tiles, both
combine schedules, both combine modes, ``needs``); these kernels differ where the gate enters:

- the pre-activation is two GEMMs over one pass of the gathered x rows: ``Ag = X Kg^T + bg`` and
  ``Au = X Ku^T + bu``, both kept on chip; ``H = act(Ag) * Au``;
- ``saved`` is ``(T * top_k, 2 * block_size)`` per *sorted row* (row ``r`` of the routing, as the
  plain kernels store A), ``[Ag | Au]``: the protocol's reference layout, in sorted-row order so
  that a tile's rows are contiguous;
- the dh kernel forms ``dH = dY V^T``, ``dgate = rowsum(H * dH)``, ``gH = gate * H``,
  ``dAu = gate * dH * act(Ag)`` and ``dAg = gate * dH * Au * act'(Ag)``, the last two in two
  separate ``(T * top_k, block_size)`` buffers so that the weight gradients reuse the plain dW
  kernel unchanged (``dKg = X^T dAg``, ``dKu = X^T dAu``, ``dV = dY^T gH``, the biases their
  column sums);
- the dx kernel adds both products per d_model chunk: ``dX = dAg Kg + dAu Ku``.

Tuning configs are the plain kernels' (``_configs.py``) pruned for two tiles
(``_configs.fits(..., gated=True)``); ``bench/aot_check.py`` compiles them (``_aot.py``). Two
fp32 ``[BLOCK_T, G]`` accumulators spill past g=128 (64 on the FMA path): there the forward
takes the slice schedule whatever it is asked (no fused config fits,
:func:`~._configs.gated_fused_fits`) and the pre-activation kernel covers a tile's cells in
chunks (:func:`~._configs.gated_pre_cells`, ``program_id(2)``). Where no gated dx config fits
(fp32 at g=256: shared memory), dx runs the plain dx kernel twice into one combine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import autotune, dot, dot_kind, dot_precision, on_tensor_device
from .block_ffn import (
    _SCHED_CHUNK,
    Routing,
    _act,
    _act_grad,
    _assert_inputs,
    _block_ffn_dw_kernel,
    _block_ffn_dx_kernel,
    _by_slot,
    _combine,
    _contig,
    _gather_dot,
    _launch,
    _tile,
    max_tiles,
    padded_block,
    resolve_schedule,
    sort_pairs,
)


def _tuned(kernel: str, restore_value=()):
    """Autotuned over the plain kernel's configs, pruned for the gated kernels' two tiles."""

    def prune(configs, named_args, **kwargs):
        x = next(v for k, v in named_args.items() if k.endswith("_ptr") and hasattr(v, "dtype"))
        dot_k = dot_kind(x.dtype, kwargs["DOT_PREC"])
        G = kwargs.get("BLOCK_C", kwargs.get("G"))  # the pre kernel's cells per program
        keep = {id(c) for c in _configs.launch_configs(kernel, dot_k, G,
                                                        x.element_size(),
                                                        kwargs.get("LOAD_A", True), gated=True)}
        return [c for c in configs if id(c) in keep]

    return autotune(_configs.configs(kernel), prune=prune, restore_value=restore_value)


@triton.jit
def _gather_dot2(x_ptr, tok, m_r, gk_ptr, keys_ptr, cells, m_c, d_model, stride_x, stride_k,
                 DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                 NC: tl.constexpr):
    """``x[tok] @ gate_keys[cells]^T`` and ``x[tok] @ keys[cells]^T`` in fp32 ([BLOCK_T, NC]
    each), the gathered x rows read once for both."""
    b_ag = tl.zeros([BLOCK_T, NC], dtype=tl.float32)
    b_au = tl.zeros([BLOCK_T, NC], dtype=tl.float32)
    p_x = x_ptr + tok[:, None] * stride_x  # [BLOCK_T, 1]
    o_tab = cells.to(tl.int64)[None, :] * stride_k  # [1, NC]
    for k0 in range(0, d_model, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < d_model
        b_x = tl.load(p_x + o_k[None, :], mask=m_r[:, None] & m_k[None, :], other=0.0)
        m_w = m_c[None, :] & m_k[:, None]
        b_wg = tl.load(gk_ptr + o_tab + o_k[:, None], mask=m_w, other=0.0)  # [BLOCK_K, NC]
        b_wu = tl.load(keys_ptr + o_tab + o_k[:, None], mask=m_w, other=0.0)
        b_ag = dot(b_x, b_wg, b_ag, DOT_PREC)
        b_au = dot(b_x, b_wu, b_au, DOT_PREC)
    return b_ag, b_au


@triton.jit
def _pre2(x_ptr, tok, m_r, gk_ptr, keys_ptr, gb_ptr, kb_ptr, cells, m_c, d_model, stride_x,
          stride_k, HAS_GB: tl.constexpr, HAS_KB: tl.constexpr, DOT_PREC: tl.constexpr,
          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, NC: tl.constexpr):
    """Both pre-activations with their biases: (Ag, Au) fp32 [BLOCK_T, NC]."""
    b_ag, b_au = _gather_dot2(x_ptr, tok, m_r, gk_ptr, keys_ptr, cells, m_c, d_model, stride_x,
                              stride_k, DOT_PREC, BLOCK_T, BLOCK_K, NC)
    if HAS_GB:
        b_ag += tl.load(gb_ptr + cells, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if HAS_KB:
        b_au += tl.load(kb_ptr + cells, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return b_ag, b_au


@triton.jit
def _h_times_values(b_h, cells, m_c, values_ptr, stride_v, tok, m_r, acc_ptr, y_ptr, ob_ptr,
                    i_s, slice_d, d_model, stride_y, DOT_PREC: tl.constexpr,
                    HAS_OB: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr,
                    LAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``H [BLOCK_T, G] @ values[cells, slice]`` chunk by chunk over slice ``i_s``, combined."""
    d_lo = i_s * slice_d
    d_hi = tl.minimum(d_lo + slice_d, d_model)
    p_v = values_ptr + cells.to(tl.int64)[:, None] * stride_v  # [G, 1]
    for d0 in range(d_lo, d_hi, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < d_hi
        b_w = tl.load(p_v + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.0)
        b_out = dot(b_h, b_w, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), DOT_PREC)
        _combine(b_out, tok, m_r, o_d, m_d, acc_ptr, y_ptr, ob_ptr, d_model, stride_y, HAS_OB,
                 ATOMIC, FIRST, LAST)


@_tuned("fwd", restore_value=("acc_ptr", "y_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _gated_fwd_kernel(
    x_ptr, gk_ptr, keys_ptr, values_ptr, gb_ptr, kb_ptr, gates_ptr, ob_ptr, order_ptr,
    seg_off_ptr, a_ptr, acc_ptr, y_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_x, stride_k, stride_v, stride_y,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_GB: tl.constexpr,
    HAS_KB: tl.constexpr, HAS_OB: tl.constexpr, HAS_GATES: tl.constexpr, SAVE_A: tl.constexpr,
    ATOMIC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, DOT_PREC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fused gated forward of one (tile, d_model slice): Ag, Au (stored as ``[Ag | Au]`` when
    SAVE_A), ``H = gate * act(Ag) * Au`` on chip, ``H V`` over the slice, combined into y."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    b_ag, b_au = _pre2(x_ptr, tok, m_r, gk_ptr, keys_ptr, gb_ptr, kb_ptr, cells, m_c, d_model,
                       stride_x, stride_k, HAS_GB, HAS_KB, DOT_PREC, BLOCK_T, BLOCK_K, G)
    if SAVE_A:
        p_a = a_ptr + o_r.to(tl.int64)[:, None] * (2 * BS) + o_c[None, :]
        m_a = m_r[:, None] & m_c[None, :]
        tl.store(p_a, b_ag.to(a_ptr.dtype.element_ty), mask=m_a)
        tl.store(p_a + BS, b_au.to(a_ptr.dtype.element_ty), mask=m_a)
    b_h = tl.where(m_c[None, :], _act(b_ag, ACT) * b_au, 0.0)
    if HAS_GATES:
        b_h *= tl.load(gates_ptr + pair, mask=m_r, other=0.0)[:, None]
    _h_times_values(b_h.to(values_ptr.dtype.element_ty), cells, m_c, values_ptr, stride_v, tok,
                    m_r, acc_ptr, y_ptr, ob_ptr, i_s, slice_d, d_model, stride_y, DOT_PREC,
                    HAS_OB, ATOMIC, FIRST, LAST, BLOCK_T, BLOCK_D)


@_tuned("pre")
@triton.jit
def _gated_pre_kernel(
    x_ptr, gk_ptr, keys_ptr, gb_ptr, kb_ptr, order_ptr, seg_off_ptr, a_ptr,
    d_model, top_k, n_blocks,
    stride_x, stride_k,
    BS: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GB: tl.constexpr, HAS_KB: tl.constexpr,
    DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Both pre-activations of one tile's cell chunk ``program_id(2)`` (BLOCK_C cells: two
    [BLOCK_T, G] accumulators spill at g=256), stored as ``[Ag | Au]`` per sorted row (slice
    schedule; by slot, ``program_id(1)`` is the slot)."""
    i_t = tl.program_id(0)
    seg_base = tl.program_id(1) * n_blocks
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    b_ag, b_au = _pre2(x_ptr, tok, m_r, gk_ptr, keys_ptr, gb_ptr, kb_ptr, cells, m_c, d_model,
                       stride_x, stride_k, HAS_GB, HAS_KB, DOT_PREC, BLOCK_T, BLOCK_K, BLOCK_C)
    p_a = a_ptr + o_r.to(tl.int64)[:, None] * (2 * BS) + o_c[None, :]
    m_a = m_r[:, None] & m_c[None, :]
    tl.store(p_a, b_ag.to(a_ptr.dtype.element_ty), mask=m_a)
    tl.store(p_a + BS, b_au.to(a_ptr.dtype.element_ty), mask=m_a)


@_tuned("out", restore_value=("acc_ptr", "y_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _gated_out_kernel(
    values_ptr, gates_ptr, ob_ptr, order_ptr, seg_off_ptr, a_ptr, acc_ptr, y_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_v, stride_y,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_OB: tl.constexpr,
    HAS_GATES: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Output of one (tile, d_model slice) from the stored ``[Ag | Au]``:
    ``H = gate * act(Ag) * Au``, ``H V`` over the slice, combined into y."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    p_a = a_ptr + o_r.to(tl.int64)[:, None] * (2 * BS) + o_c[None, :]
    m_a = m_r[:, None] & m_c[None, :]
    b_ag = tl.load(p_a, mask=m_a, other=0.0).to(tl.float32)
    b_au = tl.load(p_a + BS, mask=m_a, other=0.0).to(tl.float32)
    b_h = tl.where(m_c[None, :], _act(b_ag, ACT) * b_au, 0.0)
    if HAS_GATES:
        b_h *= tl.load(gates_ptr + pair, mask=m_r, other=0.0)[:, None]
    _h_times_values(b_h.to(values_ptr.dtype.element_ty), cells, m_c, values_ptr, stride_v, tok,
                    m_r, acc_ptr, y_ptr, ob_ptr, i_s, slice_d, d_model, stride_y, DOT_PREC,
                    HAS_OB, ATOMIC, FIRST, LAST, BLOCK_T, BLOCK_D)


@_tuned("dh")
@triton.jit
def _gated_dh_kernel(
    x_ptr, gk_ptr, keys_ptr, values_ptr, gb_ptr, kb_ptr, gates_ptr, dy_ptr, a_ptr, order_ptr,
    seg_off_ptr, dag_ptr, dau_ptr, gh_ptr, dgates_ptr,
    d_model, top_k, n_blocks,
    stride_x, stride_k, stride_v, stride_dy,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_GB: tl.constexpr,
    HAS_KB: tl.constexpr, HAS_GATES: tl.constexpr, LOAD_A: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_DGATES: tl.constexpr, DOT_PREC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per tile, BLOCK_G cells at a time: ``dH = dY V^T``, ``dgate = rowsum(H * dH)``,
    ``gH = gate * H``, ``dAu = gate * dH * act(Ag)``, ``dAg = gate * dH * Au * act'(Ag)``
    (each stored per sorted row only when needed; by slot, ``program_id(1)`` is the slot)."""
    i_t = tl.program_id(0)
    seg_base = tl.program_id(1) * n_blocks
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    p_rows = o_r.to(tl.int64)[:, None] * BS  # [BLOCK_T, 1] rows of dAg, dAu, gH
    p_a = a_ptr + o_r.to(tl.int64)[:, None] * (2 * BS)
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
            b_ag = tl.load(p_a + o_c[None, :], mask=m_rc, other=0.0).to(tl.float32)
            b_au = tl.load(p_a + BS + o_c[None, :], mask=m_rc, other=0.0).to(tl.float32)
        else:
            b_ag, b_au = _pre2(x_ptr, tok, m_r, gk_ptr, keys_ptr, gb_ptr, kb_ptr, cells, m_c,
                               d_model, stride_x, stride_k, HAS_GB, HAS_KB, DOT_PREC, BLOCK_T,
                               BLOCK_K, BLOCK_G)
        b_act = tl.where(m_c[None, :], _act(b_ag, ACT), 0.0)
        if NEED_GH or NEED_DGATES:
            b_h = b_act * b_au
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
            b_dau = b_dh * b_act
            b_dag = tl.where(m_c[None, :], b_dh * b_au * _act_grad(b_ag, ACT), 0.0)
            tl.store(dau_ptr + p_rows + o_c[None, :], b_dau.to(dau_ptr.dtype.element_ty),
                     mask=m_rc)
            tl.store(dag_ptr + p_rows + o_c[None, :], b_dag.to(dag_ptr.dtype.element_ty),
                     mask=m_rc)
    if NEED_DGATES:
        tl.store(dgates_ptr + pair, b_dgate, mask=m_r)


@_tuned("dx", restore_value=("acc_ptr", "dx_ptr"))
@triton.jit(do_not_specialize=["seg_base"])
def _gated_dx_kernel(
    gk_ptr, keys_ptr, order_ptr, seg_off_ptr, dag_ptr, dau_ptr, acc_ptr, dx_ptr,
    d_model, top_k, n_blocks, seg_base, slice_d,
    stride_k, stride_dx,
    BS: tl.constexpr, G: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (tile, d_model slice): ``dX rows = dAg Kg + dAu Ku`` over the slice, both dA tiles
    loaded once, combined like y."""
    i_t = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b, o_r, m_r, pair, tok, found = _tile(i_t, seg_off_ptr, seg_base, n_blocks, order_ptr,
                                           top_k, BLOCK_T, CHUNK)
    if found == 0:
        return
    o_c = tl.arange(0, G)
    m_c = o_c < BS
    cells = i_b * BS + o_c
    p_rows = o_r.to(tl.int64)[:, None] * BS + o_c[None, :]
    m_a = m_r[:, None] & m_c[None, :]
    b_dag = tl.load(dag_ptr + p_rows, mask=m_a, other=0.0)  # [BLOCK_T, G]
    b_dau = tl.load(dau_ptr + p_rows, mask=m_a, other=0.0)
    d_lo = i_s * slice_d
    d_hi = tl.minimum(d_lo + slice_d, d_model)
    o_tab = cells.to(tl.int64)[:, None] * stride_k  # [G, 1]
    for d0 in range(d_lo, d_hi, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < d_hi
        m_w = m_c[:, None] & m_d[None, :]
        b_wg = tl.load(gk_ptr + o_tab + o_d[None, :], mask=m_w, other=0.0)  # [G, BLOCK_D]
        b_wu = tl.load(keys_ptr + o_tab + o_d[None, :], mask=m_w, other=0.0)
        b_out = dot(b_dag, b_wg, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), DOT_PREC)
        b_out = dot(b_dau, b_wu, b_out, DOT_PREC)
        _combine(b_out, tok, m_r, o_d, m_d, acc_ptr, dx_ptr, dx_ptr, d_model, stride_dx, False,
                 ATOMIC, FIRST, LAST)


def _launch_gated(kernel, kind, grid, args, consts, deterministic):
    _launch(kernel, kind, grid, args, consts, deterministic, gated=True)


def _assert_gate(keys, gate_keys, gate_bias):
    assert gate_keys.shape == keys.shape and gate_keys.dtype == keys.dtype, gate_keys.shape
    assert gate_keys.stride() == keys.stride(), "gate_keys must be contiguous like keys"
    assert gate_bias is None or gate_bias.shape == (keys.shape[0],)


@on_tensor_device
def gated_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, gate_keys, gate_bias,
                  *, block_size, activation, save_for_backward, deterministic, schedule=None,
                  slice_d=None):
    """Gated block FFN forward over ``indices`` (see the module docstring).

    Shapes as :func:`~.block_ffn.block_ffn_fwd`, plus gate_keys (d_ff, d) in x's dtype and
    gate_bias (d_ff,) or None. Returns ``(y (T, d), saved, route)``: ``saved`` is
    ``(T * top_k, 2 * block_size)`` ``[Ag | Au]`` per sorted row in x's dtype and ``route`` the
    packed routing when ``save_for_backward``, else empty tensors.
    """
    _assert_inputs(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    _assert_gate(keys, gate_keys, gate_bias)
    key_bias, gates, out_bias = _contig(key_bias), _contig(gates), _contig(out_bias)
    gate_bias = _contig(gate_bias)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype, dev = x2d.dtype, x2d.device
    by_slot = _by_slot(deterministic, top_k)
    G, prec = padded_block(block_size), dot_precision(dtype)
    dot_k = dot_kind(dtype, prec)
    if not _configs.gated_fused_fits(dot_k, G, x2d.element_size()):
        schedule = "slice"  # no fused gated forward fits this block size
    schedule, slice_d = resolve_schedule(schedule, T, d_model, keys.shape[0], block_size, top_k,
                                         x2d.element_size(), by_slot, dev, slice_d)
    routing = sort_pairs(indices, n_blocks, by_slot=by_slot)
    sliced = schedule == "slice"
    keep_a = save_for_backward or sliced
    a = torch.empty((T * top_k, 2 * block_size), device=dev, dtype=dtype) if keep_a else x2d
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
    dummy = x2d
    kb = key_bias if key_bias is not None else dummy
    gb = gate_bias if gate_bias is not None else dummy
    common = dict(BS=block_size, G=G, DOT_PREC=prec, CHUNK=_SCHED_CHUNK)
    biases = dict(HAS_GB=gate_bias is not None, HAS_KB=key_bias is not None)
    combine = dict(HAS_OB=out_bias is not None, HAS_GATES=gates is not None, ATOMIC=not by_slot)
    n_launch = top_k if by_slot else 1
    pairs = T if by_slot else T * top_k
    n_slices = triton.cdiv(d_model, slice_d)
    grid = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_slices)
    if sliced:
        cells = _configs.gated_pre_cells(dot_k, G, x2d.element_size())
        grid_pre = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_launch,
                                 triton.cdiv(block_size, cells))
        pre = {k: v for k, v in common.items() if k != "G"}
        _launch_gated(_gated_pre_kernel, "pre", grid_pre,
                      (x2d, gate_keys, keys, gb, kb, routing.order, routing.seg_offsets, a,
                       d_model, top_k, n_blocks, x2d.stride(0), keys.stride(0)),
                      dict(pre, **biases, BLOCK_C=cells), deterministic)
    for j in range(n_launch):
        order = dict(FIRST=j == 0, LAST=j == n_launch - 1)
        if sliced:
            _launch_gated(_gated_out_kernel, "out", grid,
                          (values, gates if gates is not None else dummy,
                           out_bias if out_bias is not None else dummy, routing.order,
                           routing.seg_offsets, a, acc, y, d_model, top_k, n_blocks,
                           j * n_blocks, slice_d, values.stride(0), y.stride(0)),
                          dict(common, **combine, **order, ACT=activation), deterministic)
        else:
            _launch_gated(_gated_fwd_kernel, "fwd", grid,
                          (x2d, gate_keys, keys, values, gb, kb,
                           gates if gates is not None else dummy,
                           out_bias if out_bias is not None else dummy, routing.order,
                           routing.seg_offsets, a, acc, y, d_model, top_k, n_blocks,
                           j * n_blocks, slice_d, x2d.stride(0), keys.stride(0),
                           values.stride(0), y.stride(0)),
                          dict(common, **biases, **combine, **order, ACT=activation,
                               SAVE_A=bool(save_for_backward)), deterministic)
    if not by_slot and acc is not y:
        y.copy_(acc)
    if not save_for_backward:
        return y, x2d.new_empty(0), indices.new_empty(0)
    return y, a, routing.pack()


@on_tensor_device
def gated_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, route, gate_keys,
                  gate_bias, *, block_size, activation, deterministic, needs=(True,) * 7,
                  schedule=None, slice_d=None):
    """Gated block FFN backward: ``(dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys,
    dgate_bias)`` (``sfnn.ops.GRAD_NAMES`` order), each None when not in ``needs`` or of an absent
    input; only the kernels the needed outputs depend on run. ``saved`` / ``route`` are
    :func:`gated_ffn_fwd`'s (empty: recomputed / sorted again)."""
    _assert_inputs(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    _assert_gate(keys, gate_keys, gate_bias)
    assert dy.shape == x2d.shape and dy.dtype == x2d.dtype and dy.is_contiguous()
    assert len(needs) == 7, needs
    key_bias, gates, gate_bias = _contig(key_bias), _contig(gates), _contig(gate_bias)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype, dev = x2d.dtype, x2d.device
    need_dx, need_dk, need_dv, need_dkb, need_dg, need_dgk, need_dgb = (bool(n) for n in needs)
    need_dkb = need_dkb and key_bias is not None
    need_dg = need_dg and gates is not None
    need_dgb = need_dgb and gate_bias is not None
    need_da = need_dx or need_dk or need_dkb or need_dgk or need_dgb
    if not (need_da or need_dv or need_dg):
        return (None,) * 7
    load_a = saved.numel() > 0
    assert not load_a or saved.shape == (T * top_k, 2 * block_size), saved.shape
    by_slot = _by_slot(deterministic, top_k)
    if route is not None and route.numel():
        routing = Routing.unpack(route, T, top_k, n_blocks, by_slot)
    else:
        routing = sort_pairs(indices, n_blocks, by_slot=by_slot)
    dummy = x2d
    kb = key_bias if key_bias is not None else dummy
    gb = gate_bias if gate_bias is not None else dummy
    common = dict(BS=block_size, G=padded_block(block_size), DOT_PREC=dot_precision(dtype),
                  CHUNK=_SCHED_CHUNK)
    n_slots = top_k if by_slot else 1
    pairs = T if by_slot else T * top_k

    def buf():
        return torch.empty((T * top_k, block_size), device=dev, dtype=dtype)

    dag, dau = (buf(), buf()) if need_da else (dummy, dummy)
    gh = buf() if need_dv else dummy
    dgates = torch.empty((T, top_k), device=dev, dtype=torch.float32) if need_dg else None
    grid_h = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]), n_slots)
    _launch_gated(_gated_dh_kernel, "dh", grid_h,
                  (x2d, gate_keys, keys, values, gb, kb, gates if gates is not None else dummy,
                   dy, saved if load_a else dummy, routing.order, routing.seg_offsets, dag, dau,
                   gh, dgates if need_dg else dummy, d_model, top_k, n_blocks, x2d.stride(0),
                   keys.stride(0), values.stride(0), dy.stride(0)),
                  dict(common, ACT=activation, HAS_GB=gate_bias is not None,
                       HAS_KB=key_bias is not None, HAS_GATES=gates is not None, LOAD_A=load_a,
                       NEED_DA=need_da, NEED_GH=need_dv, NEED_DGATES=need_dg), deterministic)

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
        if _configs.gated_dx_fits(dot_kind(dtype, common["DOT_PREC"]), common["G"],
                                  x2d.element_size()):
            for j in range(n_slots):
                _launch_gated(_gated_dx_kernel, "dx", grid_x,
                              (gate_keys, keys, routing.order, routing.seg_offsets, dag, dau,
                               acc, dx, d_model, top_k, n_blocks, j * n_blocks, slice_d,
                               keys.stride(0), dx.stride(0)),
                              dict(common, ATOMIC=not by_slot, FIRST=j == 0,
                                   LAST=j == n_slots - 1), deterministic)
        else:  # the plain dx kernel twice, dAg Kg then dAu Ku, into one combine (by slot: in
            # that fixed order, the first pass's first slot storing, the second's last writing)
            passes = [(gate_keys, dag, j) for j in range(n_slots)] + [
                (keys, dau, j) for j in range(n_slots)]
            for i, (table, da, j) in enumerate(passes):
                _launch(_block_ffn_dx_kernel, "dx", grid_x,
                        (table, routing.order, routing.seg_offsets, da, acc, dx, d_model,
                         top_k, n_blocks, j * n_blocks, slice_d, table.stride(0), dx.stride(0)),
                        dict(common, ATOMIC=not by_slot, FIRST=i == 0,
                             LAST=i == len(passes) - 1), deterministic)
        if not by_slot and acc is not dx:
            dx.copy_(acc)

    w_common = dict(BS=block_size, G=common["G"], DOT_PREC=common["DOT_PREC"])

    def weight_grad(src, b, need_w, need_b, like_w, like_b):
        """The plain dW kernel over one ``(T * top_k, block_size)`` buffer: (dW, dbias)."""
        if not (need_w or need_b):
            return None, None
        dw = torch.empty_like(like_w) if need_w else None
        db = torch.empty_like(like_b) if need_b else None
        grid_w = lambda meta: (triton.cdiv(d_model, meta["BLOCK_D"]) if need_w else 1,
                               triton.cdiv(block_size, meta["BLOCK_G"]), n_blocks)
        _launch(_block_ffn_dw_kernel, "dw", grid_w,
                (src, b, routing.order, routing.seg_offsets, dw if need_w else dummy,
                 db if need_b else dummy, d_model, top_k, n_blocks, n_slots, src.stride(0),
                 like_w.stride(0)),
                dict(w_common, HAS_DW=need_w, HAS_DB=need_b), deterministic)
        return dw, db

    dkeys, dkey_bias = weight_grad(x2d, dau, need_dk, need_dkb, keys, key_bias)
    dgate_keys, dgate_bias = weight_grad(x2d, dag, need_dgk, need_dgb, gate_keys, gate_bias)
    dvalues, _ = weight_grad(dy, gh, need_dv, False, values, None)
    return dx, dkeys, dvalues, dkey_bias, dgates, dgate_keys, dgate_bias
