"""Ahead-of-time compile specs of every Triton kernel (``bench/aot_check.py`` compiles them).

A spec's signature is derived from the kernel's own parameter list (:func:`signature`): every
constexpr must be given a value, pointers take the dtype of the data they point to (int32 routing
arrays, fp32 accumulators/gates/means, the input dtype otherwise), other ints are i32. A kernel
that gains a parameter fails here loudly instead of drifting from a hand-kept tuple.

Which instances are compiled: every tuning config of every kernel for each dtype and dot kind,
at the largest block size at which the prune step keeps it (registers grow with the block), with
every optional input on (the superset of the work), for the plain and the gated kernels
(``gated_ffn.py``, pruned for their two tiles); plus, for bf16, the 128-row configs at block
sizes 64 and 128 (the report's table) and the variants whose code differs most (the deterministic
middle-slot combine, the dh recompute of A).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import _configs, avgk_topk, block_ffn, block_means, gated_ffn
from ._common import TRITON_DTYPE_NAMES, dot_kind, kernel_parameters, unwrap

BLOCK_SIZES = (16, 32, 64, 128, 256)
# The dtypes x precision the block-FFN kernels are compiled for: (label, dtype, DOT_PREC).
FFN_KINDS = (("bf16", torch.bfloat16, "tf32"), ("fp16", torch.float16, "tf32"),
             ("fp32-tf32", torch.float32, "tf32"), ("fp32-ieee", torch.float32, "ieee"))
REPORT_BLOCK_SIZES = (64, 128)


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One kernel instance to compile ahead of time.

    name: readable id, e.g. "block_ffn_fwd[bf16,g=64,BT=128,BK=64,BD=64,w=8,s=3,atomic]";
    kernel: the @triton.jit function; signature: argument name -> Triton type ("*bf16", "i32",
    "constexpr", ...); constexprs: argument name -> value for every constexpr; is_gemm: its main
    work is ``tl.dot`` on tensor cores (checked for HGMMA on sm_90); num_warps, num_stages,
    maxnreg: the config's launch options. kernel_name, dtype, block_size, rows: for reports.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    is_gemm: bool
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None
    kernel_name: str = ""
    dtype: str = ""
    block_size: int = 0
    rows: int = 0


def signature(kernel, constexprs: dict, pointers: dict, default_pointer: str) -> dict:
    """The Triton signature of ``kernel`` from its parameter list: constexprs (each must be in
    ``constexprs``, and nothing else may be), pointers (``*_ptr``: ``pointers[name]`` or
    ``default_pointer``), and i32 for the other ints."""
    params = kernel_parameters(kernel)
    const_names = {n for n, is_c in params if is_c}
    missing, extra = const_names - set(constexprs), set(constexprs) - const_names
    if missing or extra:
        raise ValueError(f"{unwrap(kernel).__name__}: constexprs missing {sorted(missing)}, "
                         f"unknown {sorted(extra)}")
    sig = {}
    for name, is_c in params:
        if is_c:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, default_pointer)
        else:
            sig[name] = "i32"
    return sig


_FFN_POINTERS = {"order_ptr": "*i32", "seg_off_ptr": "*i32", "gates_ptr": "*fp32",
                 "dgates_ptr": "*fp32", "acc_ptr": "*fp32"}
_FFN_KERNELS = {"fwd": block_ffn._block_ffn_fwd_kernel, "pre": block_ffn._block_ffn_pre_kernel,
                "out": block_ffn._block_ffn_out_kernel, "dh": block_ffn._block_ffn_dh_kernel,
                "dx": block_ffn._block_ffn_dx_kernel, "dw": block_ffn._block_ffn_dw_kernel}


def _ffn_flag_sets(kernel: str, label: str, G: int, heaviest: bool) -> list[tuple[str, dict]]:
    """(suffix, constexpr flags) variants of one block-FFN kernel (every optional input on)."""
    atomic = dict(ATOMIC=True, FIRST=False, LAST=False)
    middle = dict(ATOMIC=False, FIRST=False, LAST=False)  # by slot: load, add, store
    fwd = dict(ACT="gelu", HAS_OB=True, HAS_GATES=True)
    extra = heaviest and label in ("bf16", "fp32-ieee")
    if kernel == "fwd":
        out = [("atomic", dict(fwd, **atomic, HAS_KB=True, SAVE_A=True))]
        if extra:
            out.append(("slot", dict(fwd, **middle, HAS_KB=True, SAVE_A=True)))
        return out
    if kernel == "pre":
        return [("", dict(HAS_KB=True))]
    if kernel == "out":
        return [("atomic", dict(fwd, **atomic))]
    if kernel == "dh":
        dh = dict(ACT="gelu", HAS_KB=True, HAS_GATES=True, NEED_DA=True, NEED_GH=True,
                  NEED_DGATES=True)
        out = [("load_a", dict(dh, LOAD_A=True))]
        if extra:
            out.append(("recompute", dict(dh, LOAD_A=False)))
        return out
    if kernel == "dx":
        return [("atomic", atomic)]
    return [("", dict(HAS_DW=True, HAS_DB=True))]


# The gated kernels (gated_ffn.py); their weight gradients run on the plain dW kernel above.
_GATED_KERNELS = {"fwd": gated_ffn._gated_fwd_kernel, "pre": gated_ffn._gated_pre_kernel,
                  "out": gated_ffn._gated_out_kernel, "dh": gated_ffn._gated_dh_kernel,
                  "dx": gated_ffn._gated_dx_kernel}


def _gated_flags(flags: dict, kernel: str) -> dict:
    """The gated kernel's flags: the plain kernel's, plus the gate bias where A is formed."""
    return dict(flags, HAS_GB=True) if kernel in ("fwd", "pre", "dh") else flags


def block_ffn_specs() -> list[AOTSpec]:
    specs = []
    for kernel, fn in _FFN_KERNELS.items():
        jit = unwrap(fn)
        for label, dtype, prec in FFN_KINDS:
            elem = torch.tensor([], dtype=dtype).element_size()
            kind = dot_kind(dtype, prec)
            t = TRITON_DTYPE_NAMES[dtype]
            for cfg in _configs.configs(kernel, interpret=False):
                if cfg.dot != kind:
                    continue
                kept = [g for g in BLOCK_SIZES if _configs.fits(kernel, cfg, g, elem)]
                if not kept:
                    continue
                sizes = {max(kept): True}
                if label == "bf16" and cfg.kwargs["BLOCK_T"] >= 128:
                    sizes.update({g: sizes.get(g, False) for g in REPORT_BLOCK_SIZES if g in kept})
                for g, heaviest in sorted(sizes.items()):
                    for suffix, flags in _ffn_flag_sets(kernel, label, g, heaviest):
                        cx = dict(flags, BS=g, G=block_ffn.padded_block(g), DOT_PREC=prec,
                                  **cfg.kwargs)
                        if "CHUNK" in {n for n, _ in kernel_parameters(jit)}:
                            cx["CHUNK"] = block_ffn._SCHED_CHUNK
                        name = f"block_ffn_{kernel}[{label},g={g},{cfg.name}" + (
                            f",{suffix}]" if suffix else "]")
                        specs.append(AOTSpec(
                            name=name, kernel=jit,
                            signature=signature(jit, cx, _FFN_POINTERS, f"*{t}"),
                            constexprs=cx, is_gemm=kind == "mma", num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                            kernel_name=f"block_ffn_{kernel}",
                            dtype=label, block_size=g, rows=cfg.kwargs["BLOCK_T"]))
    return specs


def _gated_launch(kernel: str, kind: str, g: int, elem: int) -> tuple[int, list]:
    """(cells per program, configs) of a gated launch at block size ``g`` as the launcher makes
    it: the pre kernel in cell chunks, no fused forward where none fits (the slice schedule
    runs instead), the last-resort config included."""
    cells = g
    if kernel == "pre":
        cells = _configs.gated_pre_cells(kind, g, elem, interpret=False)
    elif kernel == "fwd" and not _configs.gated_fused_fits(kind, g, elem, interpret=False):
        return cells, []
    elif kernel == "dx" and not _configs.gated_dx_fits(kind, g, elem, interpret=False):
        return cells, []  # the plain dx kernel runs twice instead
    return cells, _configs.launch_configs(kernel, kind, cells, elem, interpret=False, gated=True)


def gated_ffn_specs() -> list[AOTSpec]:
    """The gated kernels (``gated_ffn.py``) in bf16 (fp16 is the same code with another element
    type), fp32-tf32 and fp32-ieee: every config at the largest block size a launch takes it,
    every optional input on; the dh kernel also recomputing its pre-activations."""
    specs = []
    for kernel, fn in _GATED_KERNELS.items():
        jit = unwrap(fn)
        for label, dtype, prec in FFN_KINDS:
            if label == "fp16":
                continue
            elem = torch.tensor([], dtype=dtype).element_size()
            kind = dot_kind(dtype, prec)
            t = TRITON_DTYPE_NAMES[dtype]
            for cfg in _configs.configs(kernel, interpret=False):
                if cfg.dot != kind:
                    continue
                kept = [g for g in BLOCK_SIZES
                        if any(c is cfg for c in _gated_launch(kernel, kind, g, elem)[1])]
                if not kept:
                    continue
                g = max(kept)
                for suffix, flags in _ffn_flag_sets(kernel, label, g, kernel == "dh"):
                    cx = dict(_gated_flags(flags, kernel), BS=g, DOT_PREC=prec, **cfg.kwargs,
                              CHUNK=block_ffn._SCHED_CHUNK)
                    if kernel == "pre":
                        cx["BLOCK_C"] = _gated_launch(kernel, kind, g, elem)[0]
                    else:
                        cx["G"] = block_ffn.padded_block(g)
                    name = f"gated_ffn_{kernel}[{label},g={g},{cfg.name}" + (
                        f",{suffix}]" if suffix else "]")
                    specs.append(AOTSpec(
                        name=name, kernel=jit,
                        signature=signature(jit, cx, _FFN_POINTERS, f"*{t}"),
                        constexprs=cx, is_gemm=kind == "mma", num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                        kernel_name=f"gated_ffn_{kernel}", dtype=label, block_size=g,
                        rows=cfg.kwargs["BLOCK_T"]))
    return specs


def avgk_topk_specs() -> list[AOTSpec]:
    """Every config with bias and scores on (the superset of the work) at the largest K_PAD it
    admits per dot kind ("ieee" is an FMA dot by design, not a GEMM for HGMMA), and at K_PAD 2
    (the shortest bitonic network) in bf16."""
    jit = unwrap(avgk_topk._avgk_topk_kernel)
    specs = []
    for cfg in _configs.topk_configs(interpret=False):
        lim = cfg.max_k_pad
        variants = [("bf16", "tf32", "16bit", 2), ("bf16", "tf32", "16bit", lim.get("16bit")),
                    ("fp16", "tf32", "16bit", lim.get("16bit")),
                    ("fp32", "tf32", "tf32", lim.get("tf32")),
                    ("fp32", "ieee", "ieee", lim.get("ieee"))]
        for t, prec, kind, k_pad in variants:
            if not k_pad:  # this config is not offered for this dot kind
                continue
            cx = dict(HAS_BIAS=True, RETURN_SCORES=True, K_PAD=k_pad, DOT_PRECISION=prec,
                      D_SPLIT={"16bit": 1, "tf32": 2, "ieee": 4}[kind], **cfg.kwargs)
            sig = signature(jit, cx, {"kbar_ptr": "*fp32", "bbar_ptr": "*fp32",
                                      "idx_ptr": "*i32", "score_ptr": "*fp32"}, f"*{t}")
            specs.append(AOTSpec(
                name=f"avgk_topk[{t}/{prec},{cfg.name},K={k_pad}]", kernel=jit, signature=sig,
                constexprs=cx, is_gemm=kind != "ieee", num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, kernel_name="avgk_topk",
                dtype=t, rows=cfg.kwargs["BLOCK_T"]))
    return specs


def block_means_specs() -> list[AOTSpec]:
    """Every config in bf16, fp16 and fp32, bias on and off."""
    jit = unwrap(block_means._block_means_kernel)
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_DTYPE_NAMES[dtype]
        for cfg in _configs.block_means_configs(interpret=False):
            for has_bias in (True, False):
                cx = {"HAS_BIAS": has_bias, **cfg.kwargs}
                sig = signature(jit, cx, {"kbar_ptr": "*fp32", "bbar_ptr": "*fp32"}, f"*{t}")
                specs.append(AOTSpec(
                    name=(f"block_means[{t},G={cfg.kwargs['BLOCK_G']},"
                          f"D={cfg.kwargs['BLOCK_D']},bias={int(has_bias)}]"),
                    kernel=jit, signature=sig, constexprs=cx, is_gemm=False,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    kernel_name="block_means", dtype=t))
    return specs


def specs() -> list[AOTSpec]:
    """Every spec of every kernel."""
    return avgk_topk_specs() + block_means_specs() + block_ffn_specs() + gated_ffn_specs()
