"""Fused block-FFN forward and backward over given block indices (Triton).

``y_t = sum_j gate[t, j] * sum_{i in block indices[t, j]} act(x_t . k_i + b_i) v_i + out_bias``

Work is split into (block, tile of that block's pairs) programs. The pairs ``p = t * top_k + j``
are sorted by block on the device (``routing.py``); a program finds its tile itself, gathers its
tokens' rows of x straight from the index (no padded copy; only the last tile of a block is
partial, and masked), and keeps ``H = act(X_b K_b^T + b_b)`` (``BLOCK_T x G``, G = block size
rounded up to a power of two >= 16, the extra cells masked) on chip for the second GEMM
``H V_b``, which it runs chunk by chunk over d_model. Any block size 1..256 works; the tile
height ``BLOCK_T`` >= 64 keeps sm_90 on the wgmma (HGMMA) path.

The combine (summing each token's ``top_k`` partial outputs):

- default (``deterministic=False``, ``top_k > 1``): every program adds its fp32 partial rows
  into one fp32 ``(T, d_model)`` buffer with ``atomic_add`` (initialised with ``out_bias``),
  then the buffer is cast to the output dtype (for fp32 inputs the buffer is the output).
  Cost: ``T * top_k * d_model`` fp32 atomic read-modify-writes, resolved in L2 (8 bytes of L2
  traffic per element, against ``4 * g`` FLOPs per element of the pair's GEMMs), plus one
  ``T * d_model`` fp32 read and output write for the cast; extra memory one fp32 ``(T, d)``.
  The summation order depends on scheduling, so results may differ in the last bits.
- ``deterministic=True`` (and always when ``top_k == 1``): the pairs are sorted by
  (slot, block) and the kernel is launched once per slot. Within one slot every token occurs
  once, so no two programs touch the same row: slot 0 stores its partial, the middle slots load,
  add and store, and the last slot adds ``out_bias`` and writes the output in its dtype. The
  sum is always taken in slot order: bitwise repeatable, no float atomics. Cost: the same
  ``8 * T * top_k * d_model`` bytes of fp32 accumulator traffic (through L2/HBM instead of L2
  atomics), ``top_k`` launches, and smaller tiles (a block's weights are read once per slot
  that chose it, not once per block). Neither mode writes a ``(T * top_k, d_model)`` partial
  buffer (9 GB in fp32 at 70k tokens, d 4096, top_k 8).

The backward scatters ``dx`` with the same two schemes.

Recompute or store: the forward stores the pre-activation ``A = X_b K_b^T + b_b`` of every
pair (``(T * top_k, g)`` in x's dtype, indexed by pair id) when ``save_for_backward``. Reading
it back costs ``2 * g`` bytes per pair (bf16) where recomputing costs ``2 * d_model * g`` FLOPs
and re-reading the keys; at d_model 4096 on an H200 the recompute takes about 10x longer than
the load. The memory is ``top_k * g / d_ff`` of what a dense FFN's saved activation takes.
``A`` (not ``H``) is kept because ``act'`` needs the pre-activation for gelu and silu. When
``saved`` is empty the backward recomputes ``A`` instead.

The backward runs three kernels, so that no program holds more than a BLOCK_G-cell chunk of a
block (g = 256 would not fit in registers otherwise):
``_block_ffn_bwd_kernel`` (dh; per tile, one launch over every segment) forms, BLOCK_G cells at
a time, ``dH = dY V_b^T``, ``dgate = rowsum(H * dH)``, ``dA = gate * dH * act'(A)`` and
``gH = gate * H`` and writes ``dA`` and ``gH`` (in the input dtype, per sorted row: 4 * g bytes
per pair in bf16, written once and read twice); ``_block_ffn_bwd_dx_kernel`` (per tile)
scatters ``dX = dA K_b`` with the same combine as the forward; ``_block_ffn_bwd_dw_kernel``
(groupXtY: one program per (block, d_model chunk, cell chunk), looping over all of the block's
rows in sorted order) forms ``dK_b^T = X^T dA``, ``dV_b^T = dY^T gH`` and ``db_b = colsum(dA)``
with no atomics, and writes zeros for blocks nobody chose.

fp32 inputs with matmul precision "highest" (true fp32 products) have no tensor-core path, so
``tl.dot`` runs on the FMA units; the prune step then keeps one small (32 x 32) config per
kernel. With "high"/"medium" the fp32 kernels use tf32 on the tensor cores and the normal tiles.

Host side: no ``.item()``/``.cpu()``/``.tolist()``; grids are sized from host ints only
(``max_tiles``), so the launchers are CUDA-graph and torch.compile friendly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sfnn._activations import ACTIVATIONS

from ._common import TRITON_DTYPE_NAMES, AOTSpec, dot_precision
from .routing import _find_tile, max_tiles, route

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SCHED_CHUNK = 256
_MAX_G = 256
# Triton's interpreter (3.6 and 3.9) multiplies bf16 dot operands as their raw uint16 bits; under
# it, and only there, bf16 operands are upcast to fp32 before tl.dot (see _dot).
_UPCAST_BF16_DOT = tl.constexpr(_INTERPRET)


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _UPCAST_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _act(a, ACT: tl.constexpr):
    if ACT == "relu":
        h = tl.maximum(a, 0.0)
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
def _rows_dot_cells(x_ptr, keys_ptr, tok, rmask, cells, cmask, d_model, stride_x, stride_k,
                    DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                    G: tl.constexpr):
    """X[tok] T[cells]^T in fp32, [BLOCK_T, G]: gathered rows of a (T, d_model) activation
    against rows of a (d_ff, d_model) table (keys for A, values for dH)."""
    acc = tl.zeros([BLOCK_T, G], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_K):
        dk = d0 + tl.arange(0, BLOCK_K)
        dmask = dk < d_model
        b_x = tl.load(x_ptr + tok[:, None] * stride_x + dk[None, :],
                      mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
        b_k = tl.load(keys_ptr + cells[None, :] * stride_k + dk[:, None],
                      mask=cmask[None, :] & dmask[:, None], other=0.0)  # [BLOCK_K, G]
        acc = _dot(b_x, b_k, acc, DOT_PREC)
    return acc


@triton.jit
def _accumulate_rows(b_out, tok, rmask, dn, dmask, acc_ptr, out_ptr, ob_ptr, d_model, stride_out,
                     HAS_OB: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr,
                     LAST: tl.constexpr):
    """Adds fp32 partial rows [BLOCK_T, BLOCK_D] into the token rows (see the combine)."""
    m = rmask[:, None] & dmask[None, :]
    p_acc = acc_ptr + tok[:, None] * d_model + dn[None, :]
    if ATOMIC:
        tl.atomic_add(p_acc, b_out, mask=m, sem="relaxed")
    else:
        if not FIRST:
            b_out += tl.load(p_acc, mask=m, other=0.0)
        if LAST:
            if HAS_OB:
                b_out += tl.load(ob_ptr + dn, mask=dmask, other=0.0).to(tl.float32)[None, :]
            p_out = out_ptr + tok[:, None] * stride_out + dn[None, :]
            tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(p_acc, b_out, mask=m)


def _configs(kind: str, interpret: bool = _INTERPRET) -> list:
    """Tuning configs of one kernel ("fwd", "dh", "dx", "dw"); one config under the interpreter.

    Meta-parameters: BLOCK_T token rows per tile, BLOCK_K d_model step of the X K^T GEMM,
    BLOCK_D d_model chunk of the output / gradient GEMMs, BLOCK_G cells per chunk (backward).
    GPU tiles: the token tile (M of the fwd/dh/dx GEMMs) and the d_model chunk (M of the dW
    GEMMs) are >= 64 so sm_90 runs them as wgmma; the prune step drops configs whose
    accumulators or pipelined tiles do not fit at the padded block size G (see _fits).
    """
    if interpret:
        return [triton.Config({"BLOCK_T": 32, "BLOCK_K": 32, "BLOCK_D": 32, "BLOCK_G": 16},
                              num_warps=4, num_stages=1)]
    shapes = {  # (BLOCK_T, BLOCK_K, BLOCK_D, BLOCK_G, num_warps, num_stages)
        "fwd": [(64, 64, 64, 0, 4, 3), (64, 64, 128, 0, 8, 3), (128, 32, 64, 0, 8, 3),
                (64, 32, 64, 0, 8, 2), (64, 32, 32, 0, 8, 2)],
        "dh": [(64, 64, 64, 64, 8, 3), (64, 32, 64, 32, 4, 3), (64, 64, 128, 64, 8, 3)],
        "dx": [(64, 0, 64, 64, 4, 3), (64, 0, 128, 64, 8, 3), (128, 0, 64, 64, 8, 3)],
        "dw": [(64, 0, 64, 64, 4, 3), (64, 0, 128, 64, 8, 3), (128, 0, 64, 128, 8, 3),
               (32, 0, 128, 128, 8, 4)],
    }[kind]
    # True-fp32 products (input_precision="ieee", the default for fp32 inputs) have no
    # tensor-core path: tl.dot runs on FMA units and needs small tiles to stay in registers.
    shapes = shapes + _IEEE_SHAPES[kind]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk, "BLOCK_D": bd, "BLOCK_G": bg},
                          num_warps=w, num_stages=s) for bt, bk, bd, bg, w, s in shapes]


_IEEE_SHAPES = {"fwd": [(32, 16, 32, 0, 8, 2), (32, 32, 32, 0, 8, 2)],
                "dh": [(32, 32, 32, 32, 8, 2), (32, 32, 32, 32, 8, 3)],
                "dx": [(32, 0, 32, 32, 4, 2)],
                "dw": [(32, 0, 32, 32, 4, 2)]}


def _is_ieee(cfg) -> bool:
    """The FMA-path config of a kernel (32 x 32 tiles), used only for ``DOT_PREC="ieee"``."""
    return cfg.kwargs["BLOCK_T"] == 32 and cfg.kwargs["BLOCK_D"] == 32


def _ieee_dh_stages_ok(kind: str, cfg, load_a) -> bool:
    """The FMA-path dh kernel compiles without a stack frame at 3 stages when it loads A and
    at 2 when it recomputes A (triton 3.6 and 3.9, sm_80 and sm_90)."""
    if kind != "dh" or not _is_ieee(cfg) or load_a is None:
        return True
    return cfg.num_stages == (3 if load_a else 2)


def _fits(kind: str, cfg, G: int, elem: int) -> bool:
    """Register and shared-memory estimate of one config at padded block size G.

    Calibrated against the compiled kernels (``bench/aot_check.py``: registers and spills from
    ``cuobjdump``) on sm_80, the tighter target. fp32 accumulator elements per thread held
    across a loop: fwd (H and the output chunk) <= 80; dh (dH chunk, with A, H and dA beside
    it) <= 16; dx (output chunk) <= 32; dW (transposed weight chunk) <= 64; for fp32 the dx
    and dW d_model chunks <= 64. Shared memory: the
    pipelined tiles of the larger GEMM loop (plus H) within 160 KB (sm_80 allows 163 KB).
    """
    kw = cfg.kwargs
    bt, bk, bd, bg = kw["BLOCK_T"], kw["BLOCK_K"], kw["BLOCK_D"], kw["BLOCK_G"]
    if _is_ieee(cfg):  # FMA path; the forward's K step is spill-free at 16 up to g=64, else 32
        return kind != "fwd" or (bk == 16) == (G <= 64)
    threads = 32 * cfg.num_warps
    s = cfg.num_stages
    if kind == "fwd":
        ok = bt * (G + bd) / threads <= 80
        smem = s * max(bt * bk + bk * G, G * bd) * elem + bt * G * elem
    elif kind == "dh":
        ok = bg <= G and bt * bg / threads <= 16
        smem = s * max(bt * bd + bd * bg, bt * bk + bk * bg) * elem
    elif kind == "dx":
        ok = bg <= G and bt * bd / threads <= 32 and (elem < 4 or bd <= 64)
        smem = s * (bt * bg + bg * bd) * elem
    else:
        ok = bg <= G and bd * bg / threads <= 64 and (elem < 4 or bd <= 64)
        smem = s * (bd * bt + bt * bg) * elem
    return ok and smem <= 160 * 1024


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        G = _padded_block(kwargs.get("BS", named_args.get("BS")))
        x = named_args.get("x_ptr", named_args.get("keys_ptr"))
        elem = x.element_size() if hasattr(x, "element_size") else 2
        ieee = kwargs.get("DOT_PREC", named_args.get("DOT_PREC")) == "ieee"
        kept = [c for c in configs if _is_ieee(c) == ieee and _fits(kind, c, G, elem)
                and _ieee_dh_stages_ok(kind, c, kwargs.get("LOAD_A"))]
        if not kept:  # never empty: the smallest config
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_D"])]
        return kept
    return prune


@triton.autotune(configs=_configs("fwd"), key=["d_model", "G", "ACT", "GATED", "SAVE_A"],
                 prune_configs_by={"early_config_prune": _pruner("fwd")},
                 restore_value=["acc_ptr", "y_ptr"])
@triton.jit(do_not_specialize=["seg_base"])
def _block_ffn_fwd_kernel(
    x_ptr, keys_ptr, values_ptr, kb_ptr, gates_ptr, ob_ptr, order_ptr, seg_off_ptr, a_ptr,
    acc_ptr, y_ptr,
    d_model, top_k, n_blocks, seg_base,
    stride_x, stride_k, stride_v, stride_y,
    BS: tl.constexpr, G: tl.constexpr, ACT: tl.constexpr, HAS_KB: tl.constexpr,
    HAS_OB: tl.constexpr, GATED: tl.constexpr, SAVE_A: tl.constexpr, ATOMIC: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per tile: A = X_b K_b^T + b_b (stored per pair when SAVE_A), H = act(A) on chip,
    then H V_b chunk by chunk over d_model, times the gate, combined into y.
    (BLOCK_G is unused here: one config list serves every kernel.)"""
    i_t = tl.program_id(0)
    i_b, row0, row_end, found = _find_tile(i_t, seg_off_ptr, seg_base, n_blocks, BLOCK_T, CHUNK)
    if found == 0:
        return
    rows = row0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    rmask = rows < row_end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = pair // top_k
    o_c = tl.arange(0, G)
    cmask = o_c < BS
    cells = i_b.to(tl.int64) * BS + o_c  # [G]

    b_a = _rows_dot_cells(x_ptr, keys_ptr, tok, rmask, cells, cmask, d_model, stride_x,
                          stride_k, DOT_PREC, BLOCK_T, BLOCK_K, G)  # [BLOCK_T, G]
    if HAS_KB:
        b_a += tl.load(kb_ptr + cells, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SAVE_A:
        tl.store(a_ptr + pair[:, None] * BS + o_c[None, :], b_a.to(a_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
    b_h = tl.where(cmask[None, :], _act(b_a, ACT), 0.0).to(values_ptr.dtype.element_ty)
    if GATED:
        b_g = tl.load(gates_ptr + pair, mask=rmask, other=0.0)  # [BLOCK_T] fp32

    for d0 in range(0, d_model, BLOCK_D):
        dn = d0 + tl.arange(0, BLOCK_D)
        dmask = dn < d_model
        b_v = tl.load(values_ptr + cells[:, None] * stride_v + dn[None, :],
                      mask=cmask[:, None] & dmask[None, :], other=0.0)  # [G, BLOCK_D]
        b_y = _dot(b_h, b_v, None, DOT_PREC)  # [BLOCK_T, BLOCK_D]
        if GATED:
            b_y = b_y * b_g[:, None]
        _accumulate_rows(b_y, tok, rmask, dn, dmask, acc_ptr, y_ptr, ob_ptr, d_model, stride_y,
                         HAS_OB, ATOMIC, FIRST, LAST)



@triton.autotune(configs=_configs("dh"), key=["d_model", "BS", "ACT", "GATED", "LOAD_A"],
                 prune_configs_by={"early_config_prune": _pruner("dh")})
@triton.jit
def _block_ffn_bwd_kernel(
    x_ptr, keys_ptr, values_ptr, kb_ptr, gates_ptr, dy_ptr, a_ptr, order_ptr, seg_off_ptr,
    da_ptr, gh_ptr, dgates_ptr,
    d_model, top_k, n_blocks, n_seg,
    stride_x, stride_k, stride_v, stride_dy,
    BS: tl.constexpr, ACT: tl.constexpr, HAS_KB: tl.constexpr, GATED: tl.constexpr,
    LOAD_A: tl.constexpr, DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per tile, BLOCK_G cells at a time: dH = dY V^T, dgate = rowsum(H * dH),
    dA = gate * dH * act'(A), gH = gate * H; dA and gH stored per sorted row."""
    i_t = tl.program_id(0)
    i_s, row0, row_end, found = _find_tile(i_t, seg_off_ptr, 0, n_seg, BLOCK_T, CHUNK)
    if found == 0:
        return
    i_b = i_s % n_blocks
    rows = row0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    rmask = rows < row_end
    pair = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = pair // top_k
    p_rows = rows.to(tl.int64)[:, None] * BS
    if GATED:
        b_g = tl.load(gates_ptr + pair, mask=rmask, other=0.0)  # [BLOCK_T] fp32
        b_dgate = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, BS, BLOCK_G):
        o_c = c0 + tl.arange(0, BLOCK_G)
        cmask = o_c < BS
        cells = i_b.to(tl.int64) * BS + o_c  # [BLOCK_G]
        m_rc = rmask[:, None] & cmask[None, :]
        # dH = dY_rows V_cells^T: the same gathered-rows product as the pre-activation.
        b_dh = _rows_dot_cells(dy_ptr, values_ptr, tok, rmask, cells, cmask, d_model, stride_dy,
                               stride_v, DOT_PREC, BLOCK_T, BLOCK_D, BLOCK_G)  # [BLOCK_T, BLOCK_G]
        if LOAD_A:
            b_a = tl.load(a_ptr + pair[:, None] * BS + o_c[None, :], mask=m_rc,
                          other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_G]
        else:
            b_a = _rows_dot_cells(x_ptr, keys_ptr, tok, rmask, cells, cmask, d_model,
                                  stride_x, stride_k, DOT_PREC, BLOCK_T, BLOCK_K, BLOCK_G)
            if HAS_KB:
                b_a += tl.load(kb_ptr + cells, mask=cmask, other=0.0).to(tl.float32)[None, :]
        b_h = tl.where(cmask[None, :], _act(b_a, ACT), 0.0)
        if GATED:
            b_dgate += tl.sum(b_h * b_dh, 1)
            b_dh = b_dh * b_g[:, None]
            b_h = b_h * b_g[:, None]
        b_da = tl.where(cmask[None, :], b_dh * _act_grad(b_a, ACT), 0.0)
        tl.store(da_ptr + p_rows + o_c[None, :], b_da.to(da_ptr.dtype.element_ty), mask=m_rc)
        tl.store(gh_ptr + p_rows + o_c[None, :], b_h.to(gh_ptr.dtype.element_ty), mask=m_rc)
    if GATED:
        tl.store(dgates_ptr + pair, b_dgate, mask=rmask)


@triton.autotune(configs=_configs("dx"), key=["d_model", "BS"],
                 prune_configs_by={"early_config_prune": _pruner("dx")},
                 restore_value=["acc_ptr", "dx_ptr"])
@triton.jit(do_not_specialize=["seg_base"])
def _block_ffn_bwd_dx_kernel(
    keys_ptr, da_ptr, order_ptr, seg_off_ptr, acc_ptr, dx_ptr,
    d_model, top_k, n_blocks, seg_base,
    stride_k, stride_dx,
    BS: tl.constexpr, ATOMIC: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    DOT_PREC: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Per tile: dX rows = dA_rows K_b, chunk by chunk over d_model, combined like y."""
    i_t = tl.program_id(0)
    i_b, row0, row_end, found = _find_tile(i_t, seg_off_ptr, seg_base, n_blocks, BLOCK_T, CHUNK)
    if found == 0:
        return
    rows = row0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    rmask = rows < row_end
    tok = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64) // top_k
    p_rows = rows.to(tl.int64)[:, None] * BS
    for d0 in range(0, d_model, BLOCK_D):
        dn = d0 + tl.arange(0, BLOCK_D)
        dmask = dn < d_model
        b_dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, BS, BLOCK_G):
            o_c = c0 + tl.arange(0, BLOCK_G)
            cmask = o_c < BS
            cells = i_b.to(tl.int64) * BS + o_c
            b_da = tl.load(da_ptr + p_rows + o_c[None, :],
                           mask=rmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_T, BLOCK_G]
            b_k = tl.load(keys_ptr + cells[:, None] * stride_k + dn[None, :],
                          mask=cmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
            b_dx = _dot(b_da, b_k, b_dx, DOT_PREC)
        _accumulate_rows(b_dx, tok, rmask, dn, dmask, acc_ptr, dx_ptr, dx_ptr, d_model,
                         stride_dx, False, ATOMIC, FIRST, LAST)


@triton.autotune(configs=_configs("dw"), key=["d_model", "BS"],
                 prune_configs_by={"early_config_prune": _pruner("dw")})
@triton.jit
def _block_ffn_bwd_dw_kernel(
    x_ptr, buf_ptr, order_ptr, seg_off_ptr, out_ptr, dkb_ptr,
    d_model, top_k, n_blocks, n_slots,
    stride_x, stride_out,
    BS: tl.constexpr, HAS_KB: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """groupXtY: ``out[block b cells, chunk]^T = sum over b's rows X[tok(row), chunk]^T buf[row]``
    (X = x, buf = dA for dkeys; X = dy, buf = gate * H for dvalues). With ``HAS_KB`` the
    d-chunk-0 programs also write ``dkb[b] = colsum(buf)``. Rows are visited in sorted order,
    slot by slot, so the sums are the same on every run."""
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    i_c = tl.program_id(2)
    dn = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dn < d_model
    o_c = i_c * BLOCK_G + tl.arange(0, BLOCK_G)
    cmask = o_c < BS
    acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_G], dtype=tl.float32)
    for j in range(0, n_slots):
        seg = j * n_blocks + i_b
        start = tl.load(seg_off_ptr + seg)
        end = tl.load(seg_off_ptr + seg + 1)
        for r0 in range(start, end, BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            rmask = rows < end
            tok = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64) // top_k
            b_xt = tl.load(x_ptr + tok[None, :] * stride_x + dn[:, None],
                           mask=rmask[None, :] & dmask[:, None], other=0.0)  # [BLOCK_D, BLOCK_T]
            b_buf = tl.load(buf_ptr + rows.to(tl.int64)[:, None] * BS + o_c[None, :],
                            mask=rmask[:, None] & cmask[None, :], other=0.0)  # [BLOCK_T, BLOCK_G]
            acc = _dot(b_xt, b_buf, acc, DOT_PREC)
            if HAS_KB:
                b_db += tl.sum(b_buf.to(tl.float32), 0)
    cells = i_b.to(tl.int64) * BS + o_c
    tl.store(out_ptr + cells[None, :] * stride_out + dn[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=cmask[None, :] & dmask[:, None])
    if HAS_KB:
        if i_d == 0:
            tl.store(dkb_ptr + cells, b_db.to(dkb_ptr.dtype.element_ty), mask=cmask)


def _padded_block(block_size: int) -> int:
    if not 1 <= block_size <= _MAX_G:
        raise ValueError(f"block_size must be in [1, {_MAX_G}] for the Triton block FFN, "
                         f"got {block_size}")
    return max(16, triton.next_power_of_2(block_size))


def _check(x2d, keys, values, indices, key_bias, gates, block_size, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x2d.dim() != 2 or keys.dim() != 2 or keys.shape != values.shape:
        raise ValueError(f"x2d (T, d), keys and values (d_ff, d) expected, got x2d "
                         f"{tuple(x2d.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}")
    if keys.shape[1] != x2d.shape[1]:
        raise ValueError(f"keys {tuple(keys.shape)} do not match x2d {tuple(x2d.shape)}")
    if keys.dtype != x2d.dtype or values.dtype != x2d.dtype:
        raise TypeError(f"x2d, keys and values must share a dtype, got {x2d.dtype}, "
                        f"{keys.dtype}, {values.dtype}")
    if keys.shape[0] % block_size:
        raise ValueError(f"block_size {block_size} does not divide d_ff {keys.shape[0]}")
    if indices.dtype != torch.int32 or indices.dim() != 2 or indices.shape[0] != x2d.shape[0]:
        raise ValueError(f"indices must be int32 (T, top_k), got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if gates is not None and (gates.dtype != torch.float32 or gates.shape != indices.shape):
        raise ValueError(f"gates must be float32 {tuple(indices.shape)}, got {gates.dtype} "
                         f"{tuple(gates.shape)}")
    if key_bias is not None and key_bias.shape != (keys.shape[0],):
        raise ValueError(f"key_bias must be ({keys.shape[0]},), got {tuple(key_bias.shape)}")
    for name, t in (("x2d", x2d), ("keys", keys), ("values", values), ("indices", indices)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _contig(t):
    return None if t is None else t.contiguous()


def route_numel(T: int, top_k: int, n_blocks: int, deterministic: bool) -> int:
    """Routing kept for the backward: none yet (the backward sorts the pairs again)."""
    return 0


def block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size,
                  activation, save_for_backward, deterministic):
    """Block FFN forward over ``indices``.

    x2d: (T, d) fp32/fp16/bf16, T >= 1; keys, values: (d_ff, d) same dtype; indices: int32
    (T, top_k); key_bias (d_ff,) / out_bias (d,) / gates float32 (T, top_k) or None.
    Returns ``(y (T, d) in x's dtype, saved)``; ``saved`` is the pre-activation
    ``(T * top_k, block_size)`` in x's dtype when ``save_for_backward``, else ``torch.empty(0)``.

    Example::

        y, saved = block_ffn_fwd(x, keys, values, idx, None, None, None, block_size=64,
                                 activation="relu", save_for_backward=True, deterministic=False)
    """
    _check(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    key_bias, gates, out_bias = _contig(key_bias), _contig(gates), _contig(out_bias)
    G = _padded_block(block_size)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype = x2d.dtype
    by_slot = deterministic or top_k == 1
    routing = route(indices, n_blocks, by_slot=by_slot)
    saved = (torch.empty((T * top_k, block_size), device=x2d.device, dtype=dtype)
             if save_for_backward else torch.empty(0, device=x2d.device, dtype=dtype))
    if by_slot:
        y = torch.empty_like(x2d)
        acc = y if dtype == torch.float32 or top_k == 1 else torch.empty(
            (T, d_model), device=x2d.device, dtype=torch.float32)
    else:
        if out_bias is not None:
            acc = out_bias.float().expand(T, d_model).contiguous()
        else:
            acc = torch.zeros((T, d_model), device=x2d.device, dtype=torch.float32)
        y = acc
    common = dict(BS=block_size, G=G, ACT=activation, HAS_KB=key_bias is not None,
                  HAS_OB=out_bias is not None, GATED=gates is not None,
                  SAVE_A=bool(save_for_backward), ATOMIC=not by_slot,
                  DOT_PREC=dot_precision(dtype), CHUNK=_SCHED_CHUNK)
    args = (x2d, keys, values, key_bias if key_bias is not None else x2d,
            gates if gates is not None else x2d, out_bias if out_bias is not None else x2d,
            routing.order, routing.seg_offsets, saved, acc, y)
    n_launch = top_k if by_slot else 1
    pairs = T if by_slot else T * top_k
    grid = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]),)
    for j in range(n_launch):
        _block_ffn_fwd_kernel[grid](
            *args, d_model, top_k, n_blocks, j * n_blocks, x2d.stride(0), keys.stride(0),
            values.stride(0), y.stride(0),
            FIRST=j == 0, LAST=j == n_launch - 1, **common)
    if not by_slot and dtype != torch.float32:
        y = acc.to(dtype)
    return y, saved, indices.new_empty(0)


def block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, saved_route=None, *,
                  block_size, activation, deterministic, needs=(True,) * 5):
    """Block FFN backward: ``(dx, dkeys, dvalues, dkey_bias | None, dgates float32 | None)``.

    dy: (T, d) contiguous in x's dtype; ``saved`` is the forward's second output (the
    pre-activation, or an empty tensor to recompute it). The gradient of ``out_bias`` is the
    caller's (``dy.sum(0)``).
    """
    _check(x2d, keys, values, indices, key_bias, gates, block_size, activation)
    if dy.shape != x2d.shape or dy.dtype != x2d.dtype or not dy.is_contiguous():
        raise ValueError(f"dy must be contiguous {tuple(x2d.shape)} {x2d.dtype}, got "
                         f"{tuple(dy.shape)} {dy.dtype}")
    key_bias, gates = _contig(key_bias), _contig(gates)
    _padded_block(block_size)
    T, d_model = x2d.shape
    top_k = indices.shape[1]
    n_blocks = keys.shape[0] // block_size
    dtype = x2d.dtype
    load_a = saved.numel() > 0
    if load_a and saved.shape != (T * top_k, block_size):
        raise ValueError(f"saved must be ({T * top_k}, {block_size}) or empty, got "
                         f"{tuple(saved.shape)}")
    by_slot = deterministic or top_k == 1
    routing = route(indices, n_blocks, by_slot=by_slot)
    dev = x2d.device
    da = torch.empty((T * top_k, block_size), device=dev, dtype=dtype)
    gh = torch.empty((T * top_k, block_size), device=dev, dtype=dtype)
    dgates = torch.empty((T, top_k), device=dev, dtype=torch.float32) if gates is not None \
        else None
    if by_slot:
        dx = torch.empty_like(x2d)
        acc = dx if dtype == torch.float32 or top_k == 1 else torch.empty(
            (T, d_model), device=dev, dtype=torch.float32)
    else:
        acc = torch.zeros((T, d_model), device=dev, dtype=torch.float32)
        dx = acc
    prec = dot_precision(dtype)
    n_slots = top_k if by_slot else 1
    kb_arg = key_bias if key_bias is not None else x2d
    grid_h = lambda meta: (max_tiles(T * top_k, n_blocks * n_slots, meta["BLOCK_T"]),)
    _block_ffn_bwd_kernel[grid_h](
        x2d, keys, values, kb_arg, gates if gates is not None else x2d, dy,
        saved if load_a else x2d, routing.order, routing.seg_offsets, da, gh,
        dgates if dgates is not None else x2d,
        d_model, top_k, n_blocks, n_blocks * n_slots,
        x2d.stride(0), keys.stride(0), values.stride(0), dy.stride(0),
        BS=block_size, ACT=activation, HAS_KB=key_bias is not None, GATED=gates is not None,
        LOAD_A=load_a, DOT_PREC=prec, CHUNK=_SCHED_CHUNK)

    pairs = T if by_slot else T * top_k
    grid_x = lambda meta: (max_tiles(pairs, n_blocks, meta["BLOCK_T"]),)
    for j in range(n_slots):
        _block_ffn_bwd_dx_kernel[grid_x](
            keys, da, routing.order, routing.seg_offsets, acc, dx,
            d_model, top_k, n_blocks, j * n_blocks, keys.stride(0), dx.stride(0),
            BS=block_size, ATOMIC=not by_slot, FIRST=j == 0, LAST=j == n_slots - 1,
            DOT_PREC=prec, CHUNK=_SCHED_CHUNK)
    if not by_slot and dtype != torch.float32:
        dx = acc.to(dtype)

    dkeys = torch.empty_like(keys)
    dvalues = torch.empty_like(values)
    dkey_bias = torch.empty_like(key_bias) if key_bias is not None else None
    grid_w = lambda meta: (n_blocks, triton.cdiv(d_model, meta["BLOCK_D"]),
                           triton.cdiv(block_size, meta["BLOCK_G"]))
    _block_ffn_bwd_dw_kernel[grid_w](
        x2d, da, routing.order, routing.seg_offsets, dkeys,
        dkey_bias if dkey_bias is not None else dkeys,
        d_model, top_k, n_blocks, n_slots, x2d.stride(0), dkeys.stride(0),
        BS=block_size, HAS_KB=key_bias is not None, DOT_PREC=prec)
    _block_ffn_bwd_dw_kernel[grid_w](
        dy, gh, routing.order, routing.seg_offsets, dvalues, dvalues,
        d_model, top_k, n_blocks, n_slots, dy.stride(0), dvalues.stride(0),
        BS=block_size, HAS_KB=False, DOT_PREC=prec)
    # TODO(kernels v2): skip the kernels whose outputs are not needed.
    grads = (dx, dkeys, dvalues, dkey_bias, dgates)
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


def _unwrap(kernel):
    """The @triton.jit function under the autotuner (the interpreted one under the
    interpreter, where it cannot be compiled ahead of time anyway)."""
    while isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return kernel


def _cfg_name(cfg) -> str:
    kw = cfg.kwargs
    return (f"BT={kw['BLOCK_T']},BK={kw['BLOCK_K']},BD={kw['BLOCK_D']},BG={kw['BLOCK_G']},"
            f"w={cfg.num_warps},s={cfg.num_stages}")


_FWD_SIG = ("x_ptr", "keys_ptr", "values_ptr", "kb_ptr", "gates_ptr", "ob_ptr", "order_ptr",
            "seg_off_ptr", "a_ptr", "acc_ptr", "y_ptr", "d_model", "top_k", "n_blocks", "seg_base",
            "stride_x", "stride_k", "stride_v", "stride_y")
_BWD_SIG = ("x_ptr", "keys_ptr", "values_ptr", "kb_ptr", "gates_ptr", "dy_ptr", "a_ptr",
            "order_ptr", "seg_off_ptr", "da_ptr", "gh_ptr", "dgates_ptr", "d_model", "top_k",
            "n_blocks", "n_seg", "stride_x", "stride_k", "stride_v", "stride_dy")
_DX_SIG = ("keys_ptr", "da_ptr", "order_ptr", "seg_off_ptr", "acc_ptr", "dx_ptr", "d_model",
           "top_k", "n_blocks", "seg_base", "stride_k", "stride_dx")
_DW_SIG = ("x_ptr", "buf_ptr", "order_ptr", "seg_off_ptr", "out_ptr", "dkb_ptr", "d_model", "top_k",
           "n_blocks", "n_slots", "stride_x", "stride_out")


def _signature(names, t: str, constexprs: dict) -> dict:
    """Triton types: int32 routing arrays, fp32 gates/dgates/accumulators, the rest in t."""
    sig = {}
    for n in names:
        if not n.endswith("_ptr"):
            sig[n] = "i32"
        elif n in ("order_ptr", "seg_off_ptr"):
            sig[n] = "*i32"
        elif n in ("gates_ptr", "dgates_ptr", "acc_ptr"):
            sig[n] = "*fp32"
        else:
            sig[n] = f"*{t}"
    sig.update({k: "constexpr" for k in constexprs})
    return sig


def aot_specs(block_sizes=(64, 256)) -> list[AOTSpec]:
    """Every GPU tuning config that survives the prune step, for each kernel, in bf16, fp16 and
    fp32, at block sizes 64 and 256 (256 is the register-heaviest), every optional input on
    (gelu, both biases, gates). The forward and dx kernels are compiled with the atomic combine
    at g=64 and the deterministic middle-slot combine (load, add, store) at g=256; the dh kernel
    with the stored pre-activation and with the recompute (a third GEMM). fp32 comes twice:
    "fp32-tf32" (matmul precision "high"/"medium": tensor cores, is_gemm) and "fp32-ieee"
    (precision "highest", the default: true fp32 products, which no NVIDIA tensor core offers,
    so tl.dot runs on the FMA units; is_gemm=False as HGMMA cannot appear)."""
    specs = []
    kernels = {kind: _unwrap(k) for kind, k in (
        ("fwd", _block_ffn_fwd_kernel), ("dh", _block_ffn_bwd_kernel),
        ("dx", _block_ffn_bwd_dx_kernel), ("dw", _block_ffn_bwd_dw_kernel))}
    names = {"fwd": "block_ffn_fwd", "dh": "block_ffn_bwd_dh", "dx": "block_ffn_bwd_dx",
             "dw": "block_ffn_bwd_dw"}
    sigs = {"fwd": _FWD_SIG, "dh": _BWD_SIG, "dx": _DX_SIG, "dw": _DW_SIG}
    for dtype, prec in ((torch.bfloat16, "tf32"), (torch.float16, "tf32"),
                        (torch.float32, "tf32"), (torch.float32, "ieee")):
        t = TRITON_DTYPE_NAMES[dtype]
        elem = torch.tensor([], dtype=dtype).element_size()
        for bs in block_sizes:
            G = _padded_block(bs)
            atomic = bs == block_sizes[0]
            combine = dict(ATOMIC=atomic, FIRST=False, LAST=False, CHUNK=_SCHED_CHUNK)
            variants = {
                "fwd": [dict(combine, G=G, ACT="gelu", HAS_KB=True, HAS_OB=True, GATED=True,
                             SAVE_A=True)],
                "dh": [dict(ACT="gelu", HAS_KB=True, GATED=True, LOAD_A=load_a,
                            CHUNK=_SCHED_CHUNK) for load_a in (True, False)],
                "dx": [combine],
                "dw": [dict(HAS_KB=True)],
            }
            for kind, flag_sets in variants.items():
                for cfg in _configs(kind, interpret=False):
                    if (prec == "ieee") != _is_ieee(cfg) or not _fits(kind, cfg, G, elem):
                        continue
                    for flags in flag_sets:
                        if not _ieee_dh_stages_ok(kind, cfg, flags.get("LOAD_A")):
                            continue
                        cx = dict(flags, BS=bs, DOT_PREC=prec, **cfg.kwargs)
                        extra = ",atomic=1" if cx.get("ATOMIC") else ""
                        if "LOAD_A" in cx:
                            extra += f",load_a={int(cx['LOAD_A'])}"
                        tname = f"{t}-{prec}" if dtype == torch.float32 else t
                        specs.append(AOTSpec(
                            name=f"{names[kind]}[{tname},g={bs},{_cfg_name(cfg)}{extra}]",
                            kernel=kernels[kind], signature=_signature(sigs[kind], t, cx),
                            constexprs=cx, is_gemm=prec != "ieee", num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages))
    return specs
