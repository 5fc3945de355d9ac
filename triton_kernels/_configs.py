"""Tuning configs of every Triton kernel: per kernel, per dot kind, by name.

The block-FFN kernels first (below), then the Avg-K top-k (:class:`TopKConfig`) and block means.

A :class:`KernelConfig` is a ``triton.Config`` that also says which dot kind it is for:
``"mma"`` (tensor cores: bf16, fp16, and fp32 under tf32) or ``"fma"`` (fp32 with true fp32
products, ``input_precision="ieee"``, which no NVIDIA tensor core offers: ``tl.dot`` runs on the
FMA units and holds both operand tiles in registers, so its tiles are small). Each kernel lists
only the meta-parameters it uses:

- ``fwd`` (fused): BLOCK_T pairs per tile, BLOCK_K d_model step of ``X K^T``, BLOCK_D d_model
  chunk of ``H V``;
- ``pre``: BLOCK_T, BLOCK_K; ``out``: BLOCK_T, BLOCK_D (the two halves of ``fwd``);
- ``dh``: BLOCK_T, BLOCK_K (d_model step of ``dY V^T``), BLOCK_G cells per chunk;
- ``dx``: BLOCK_T, BLOCK_D (d_model chunk of ``dA K``);
- ``dw``: BLOCK_T pair step (the GEMM's K), BLOCK_D d_model chunk (M), BLOCK_G cells (N).

The prune step keeps, for a launch, the configs of its dot kind that :func:`fits` at the padded
block size ``G`` (registers and shared memory, calibrated against the compiled kernels with
``bench/aot_check.py``); the autotuner times those. Deterministic mode takes the first config
that fits (:func:`fixed_config`), so its results do not depend on timing. List order is
preference order. ``python -m sfnn.triton_kernels._configs`` prints which configs run for every
kernel, dtype and block size.
"""
from __future__ import annotations

import triton

from ._common import INTERPRET


class KernelConfig(triton.Config):
    """A ``triton.Config`` for one dot kind (``dot``: "mma", "fma", or "any" under the
    interpreter); ``meta`` holds the kernel's meta-parameters by name."""

    def __init__(self, dot: str, *, num_warps: int, num_stages: int,
                 maxnreg: int | None = None, **meta):
        super().__init__(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        self.dot = dot

    @property
    def name(self) -> str:
        short = {"BLOCK_T": "BT", "BLOCK_K": "BK", "BLOCK_D": "BD", "BLOCK_G": "BG"}
        parts = [f"{short.get(k, k)}={v}" for k, v in self.kwargs.items()]
        return ",".join(parts + [f"w={self.num_warps}", f"s={self.num_stages}"])

    @property
    def threads(self) -> int:
        return 32 * self.num_warps


# Without an explicit register limit, ptxas (triton 3.6's and 3.9's) caps some of these kernels
# at 64-128 registers for occupancy and spills; ".maxnreg 255" lets it use what the tiles need.
_MAXNREG = 255


def _mma(**kw) -> KernelConfig:
    return KernelConfig("mma", maxnreg=_MAXNREG, **kw)


def _fma(**kw) -> KernelConfig:
    return KernelConfig("fma", maxnreg=_MAXNREG, **kw)


# Tensor-core tiles keep M (the token tile; for dW the d_model chunk) >= 64 so that sm_90 runs the
# GEMMs as wgmma (HGMMA); 128-row tiles come first where they fit (half the weight re-reads).
_GPU_CONFIGS = {
    "fwd": [
        _mma(BLOCK_T=128, BLOCK_K=64, BLOCK_D=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=128, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_D=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_D=64, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=2),
        _mma(BLOCK_T=64, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_K=16, BLOCK_D=32, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=2),
    ],
    "pre": [
        _mma(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=32, num_warps=8, num_stages=3),
        _fma(BLOCK_T=32, BLOCK_K=16, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_K=32, num_warps=8, num_stages=2),
    ],
    "out": [
        _mma(BLOCK_T=128, BLOCK_D=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=64, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=64, num_warps=8, num_stages=2),
        _mma(BLOCK_T=64, BLOCK_D=32, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_D=32, num_warps=8, num_stages=2),
    ],
    "dh": [
        _mma(BLOCK_T=128, BLOCK_K=64, BLOCK_G=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=128, BLOCK_K=64, BLOCK_G=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_G=256, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_G=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_G=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=32, BLOCK_G=32, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_K=64, BLOCK_G=16, num_warps=4, num_stages=3),
        _fma(BLOCK_T=32, BLOCK_K=32, BLOCK_G=32, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_K=32, BLOCK_G=16, num_warps=4, num_stages=2),
    ],
    "dx": [
        _mma(BLOCK_T=128, BLOCK_D=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=64, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=64, num_warps=8, num_stages=2),
        _mma(BLOCK_T=64, BLOCK_D=32, num_warps=8, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_D=32, num_warps=8, num_stages=2),
    ],
    "dw": [
        _mma(BLOCK_T=64, BLOCK_D=128, BLOCK_G=128, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=256, BLOCK_G=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=32, BLOCK_D=256, BLOCK_G=128, num_warps=8, num_stages=4),
        _mma(BLOCK_T=64, BLOCK_D=128, BLOCK_G=64, num_warps=8, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=64, BLOCK_G=64, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=128, BLOCK_G=32, num_warps=4, num_stages=3),
        _mma(BLOCK_T=64, BLOCK_D=128, BLOCK_G=16, num_warps=4, num_stages=3),
        _fma(BLOCK_T=32, BLOCK_D=32, BLOCK_G=32, num_warps=4, num_stages=2),
        _fma(BLOCK_T=32, BLOCK_D=32, BLOCK_G=16, num_warps=4, num_stages=2),
    ],
}

# Under the interpreter one small config per kernel (it has nothing to time); BLOCK_G=16 makes
# block sizes above 16 run in several cell chunks.
_INTERPRET_CONFIGS = {
    "fwd": dict(BLOCK_T=32, BLOCK_K=32, BLOCK_D=32),
    "pre": dict(BLOCK_T=32, BLOCK_K=32),
    "out": dict(BLOCK_T=32, BLOCK_D=32),
    "dh": dict(BLOCK_T=32, BLOCK_K=32, BLOCK_G=16),
    "dx": dict(BLOCK_T=32, BLOCK_D=32),
    "dw": dict(BLOCK_T=32, BLOCK_D=32, BLOCK_G=16),
}

KERNELS = tuple(_GPU_CONFIGS)


def configs(kernel: str, interpret: bool = INTERPRET) -> list[KernelConfig]:
    """Every config of ``kernel`` (both dot kinds); one config under the interpreter."""
    if interpret:
        return [KernelConfig("any", num_warps=4, num_stages=1, **_INTERPRET_CONFIGS[kernel])]
    return list(_GPU_CONFIGS[kernel])


def meta_names(kernel: str) -> tuple[str, ...]:
    """The meta-parameters ``kernel``'s configs set (the same in every config)."""
    return tuple(_INTERPRET_CONFIGS[kernel])


def max_block_d(interpret: bool = INTERPRET) -> int:
    """The widest d_model chunk of any config: a d_model slice is a multiple of it."""
    return max(c.kwargs.get("BLOCK_D", 0) for k in KERNELS for c in configs(k, interpret))


def fits(kernel: str, cfg: KernelConfig, G: int, elem: int, load_a: bool = True,
         gated: bool = False) -> bool:
    """Whether ``cfg`` compiles for ``kernel`` at padded block size ``G`` and element size
    ``elem`` without spilling and within shared memory, on sm_80 and sm_90 (an estimate, fitted
    to the compiled kernels; ``load_a``: the dh kernel loads A rather than recomputing it).
    ``gated``: the gated kernels (``gated_ffn.py``) hold two pre-activation tiles (gate and up)
    and read two weight tables where the plain ones hold one: counted as a block twice as wide
    (a conservative first calibration; the dW kernel is shared and unchanged).

    Registers: the fp32 elements per thread the kernel holds at its peak (accumulators and the
    on-chip operand tile) within ``_REG_LIMITS``. Shared memory, in bytes, as the compiler lays
    it out: the pipelined operand tiles (``num_stages`` deep), the [BLOCK_T, BLOCK_D] fp32 tile
    the atomic combine converts through, and the loaded [BLOCK_T, G] operand; within 160 KB
    (sm_80 allows 163 KB per block).
    """
    kw = cfg.kwargs
    bt, t = kw["BLOCK_T"], cfg.threads
    bk, bd, bg = kw.get("BLOCK_K", 0), kw.get("BLOCK_D", 0), kw.get("BLOCK_G", G)
    s = cfg.num_stages
    if gated and kernel in ("fwd", "pre") and (G > 64 if cfg.dot == "fma" else G > 128):
        return False  # two [BLOCK_T, G] accumulators spill (aot_check: fwd and pre at g=256)
    if gated and kernel == "fwd" and (cfg.num_warps < 8 or bt * bk > 64 * 64):
        return False  # spilled on sm_80 at g=64: 4 warps (3.9), 128 rows x BLOCK_K 64 (3.6)
    if cfg.dot == "fma":
        return _fits_fma(kernel, cfg, G, load_a)
    if gated and kernel == "dh":  # dH, both pre-activation chunks and both dA chunks
        regs = 2 * bt * bg / t
        smem = s * (bt * bk + bk * bg) * elem * (1 if load_a else 2)
        return bg <= G and regs <= _REG_LIMITS["dh"] and smem <= _SMEM_LIMIT
    if gated and kernel != "dw":
        return fits(kernel, cfg, 2 * G, elem, load_a)
    if kernel == "fwd":  # H [BT, G] in fp32, then the output chunk [BT, BD]
        regs = bt * (G + bd) / t * (1.2 if elem == 4 else 1)  # tf32 operand tiles are wider
        # sm_90 takes a 16-bit H from registers, a tf32 one from shared memory.
        h_smem = bt * G * elem if elem == 4 else 0
        smem = max(s * (bt * bk + bk * G) * elem, s * G * bd * elem + bt * bd * 4 + h_smem)
    elif kernel == "pre":  # A [BT, G] and the operand tiles of a K step (fp32: twice as wide)
        regs = bt * G / t + (bt * bk + bk * G) / t * elem / 4
        smem = s * (bt * bk + bk * G) * elem
    elif kernel == "out":  # act(A) [BT, G] in fp32, then the output chunk
        regs = bt * (G + bd) / t
        smem = s * G * bd * elem + bt * bd * 4 + bt * G * elem
    elif kernel == "dx":  # the dA tile [BT, G] as loaded, and the output chunk
        regs = bt * (G * elem / 4 + bd) / t
        smem = s * G * bd * elem + bt * bd * 4 + bt * G * elem
    elif kernel == "dh":  # dH [BT, BG] (and A when recomputed), with H and dA beside them
        regs = bt * bg / t
        smem = s * (bt * bk + bk * bg) * elem
        # One chunk (BG == G: dY gathered once per tile) with A loaded holds twice what a loop
        # of chunks, or the recompute of A, may.
        limit = _REG_LIMITS["dh"] * (2 if bg == G and load_a else 1)
        return bg <= G and regs <= limit and smem <= _SMEM_LIMIT
    else:  # dw: the transposed weight chunk [BD, BG]
        regs = bd * bg / t
        smem = s * (bd * bt + bt * bg) * elem
        if bg > G:
            return False
    return regs <= _REG_LIMITS[kernel] and smem <= _SMEM_LIMIT


# fp32 elements per thread (see fits), the largest that compiled without spills on sm_80 and
# sm_90 under triton 3.6 and 3.9 (bench/aot_check.py); e.g. the forward at g=256 with 128-row
# tiles (160) spills and at g=128 (96) does not; its tf32 variant spills at 96 x 1.2 on sm_80;
# the tf32 pre-activation with 4 warps at g=128 (160) spills on sm_80 under triton 3.6.
_REG_LIMITS = {"fwd": 96, "pre": 112, "out": 96, "dx": 96, "dh": 16, "dw": 64}
_SMEM_LIMIT = 160 * 1024


def _fits_fma(kernel: str, cfg: KernelConfig, G: int, load_a: bool) -> bool:
    """FMA-path configs, one small tile per kernel; the forward's K step is 16 up to G=64 (else
    32) so that its operand tiles stay in registers."""
    if kernel in ("fwd", "pre"):
        return (cfg.kwargs["BLOCK_K"] == 16) == (G <= 64)
    if kernel in ("dh", "dw"):
        return cfg.kwargs["BLOCK_G"] <= G
    return True


def launch_configs(kernel: str, dot: str, G: int, elem: int, load_a: bool = True,
                   interpret: bool = INTERPRET, gated: bool = False) -> list[KernelConfig]:
    """The configs the prune step keeps for a launch (never empty: the last resort is the
    smallest config of the dot kind); ``gated``: for the gated kernels (see :func:`fits`)."""
    cands = configs(kernel, interpret)
    if interpret:
        return cands
    mine = [c for c in cands if c.dot == dot]
    kept = [c for c in mine if fits(kernel, c, G, elem, load_a, gated)]
    if kept:
        return kept
    small = [c for c in mine if c.kwargs.get("BLOCK_G", 0) <= G] or mine
    return [min(small, key=lambda c: c.kwargs["BLOCK_T"] * c.kwargs.get("BLOCK_D", 1))]


def gated_pre_cells(dot: str, G: int, elem: int, interpret: bool = INTERPRET) -> int:
    """Cells per program of the gated pre-activation kernel: G, halved until a config fits (its
    two accumulators spill at g=256); 16 under the interpreter, so that the tests cross
    several cell chunks."""
    if interpret:
        return min(G, 16)
    c = G
    while c > 16 and not any(fits("pre", cfg, c, elem, gated=True)
                             for cfg in configs("pre", interpret) if cfg.dot == dot):
        c //= 2
    return c


def gated_fused_fits(dot: str, G: int, elem: int, interpret: bool = INTERPRET) -> bool:
    """Whether a fused gated forward config fits at G; where none does, the gated forward runs
    the slice schedule (pre-activation in cell chunks, then the output kernel)."""
    return interpret or any(fits("fwd", cfg, G, elem, gated=True)
                            for cfg in configs("fwd", interpret) if cfg.dot == dot)


def gated_dx_fits(dot: str, G: int, elem: int, interpret: bool = INTERPRET) -> bool:
    """Whether a gated dx config fits at G (both dA tiles on chip); where none does (fp32 at
    g=256 exceeds shared memory), the gated backward runs the plain dx kernel twice instead,
    ``dAg Kg`` then ``dAu Ku``, into one combine."""
    return interpret or any(fits("dx", cfg, G, elem, gated=True)
                            for cfg in configs("dx", interpret) if cfg.dot == dot)


def fixed_config(kernel: str, dot: str, G: int, elem: int, load_a: bool = True,
                 interpret: bool = INTERPRET, gated: bool = False) -> KernelConfig:
    """The one config deterministic mode uses: the first that fits (no timing involved)."""
    return launch_configs(kernel, dot, G, elem, load_a, interpret, gated)[0]


def _table() -> str:
    lines = []
    for kernel in KERNELS:
        for name, elem, dot in (("bf16/fp16", 2, "mma"), ("fp32 tf32", 4, "mma"),
                                ("fp32 ieee", 4, "fma")):
            for G in (16, 32, 64, 128, 256):
                names = " | ".join(c.name for c in launch_configs(kernel, dot, G, elem,
                                                                  interpret=False))
                lines.append(f"{kernel:<4} {name:<10} G={G:<4} {names}")
    return "\n".join(lines)


class TopKConfig(triton.Config):
    """A config of the fused Avg-K top-k kernel with the largest ``K_PAD`` (top_k rounded up to
    a power of two) it holds per dot kind without spilling: ``max_k_pad["16bit"]`` (bf16/fp16 x,
    hi/lo kbar), ``["tf32"]`` (fp32 x, tf32) and ``["ieee"]`` (fp32 x, FMA dot, whose operand
    tiles also live in registers); a kind it lacks is not offered. The running top-K list and the
    chunk's keys are int64 in registers, so the limit is read from the compiled kernels
    (``bench/aot_check.py`` compiles each config at its limits)."""

    def __init__(self, max_k_pad: dict, *, num_warps: int, num_stages: int,
                 maxnreg: int | None = None, **meta):
        super().__init__(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        self.max_k_pad = dict(max_k_pad)

    @property
    def name(self) -> str:
        kw = self.kwargs
        return (f"T={kw['BLOCK_T']},N={kw.get('BLOCK_N', 'K')},D={kw['BLOCK_D']},"
                f"w={self.num_warps}")


# Without an explicit register limit, ptxas (the one in triton 3.6's wheel) sometimes caps these
# 256-thread kernels at 128 registers and spills; ".maxnreg 255" lets it use what it needs.
_TOPK_MAXNREG = 255
# BLOCK_T >= 64 so that the score GEMM runs on Hopper's warpgroup MMA; the first config takes
# every K_PAD up to the largest in every kind.
_TOPK_CONFIGS = [
    TopKConfig({"16bit": 64, "tf32": 64, "ieee": 64}, BLOCK_T=64, BLOCK_N=64, BLOCK_D=64,
               num_warps=8, num_stages=3, maxnreg=_TOPK_MAXNREG),
    TopKConfig({"16bit": 32, "tf32": 32}, BLOCK_T=128, BLOCK_N=64, BLOCK_D=64,
               num_warps=8, num_stages=3, maxnreg=_TOPK_MAXNREG),
    TopKConfig({"16bit": 16}, BLOCK_T=128, BLOCK_N=128, BLOCK_D=32,
               num_warps=8, num_stages=3, maxnreg=_TOPK_MAXNREG),
]
TOPK_MAX_K_PAD = max(max(c.max_k_pad.values()) for c in _TOPK_CONFIGS)


def topk_configs(interpret: bool = INTERPRET) -> list[TopKConfig]:
    """The top-k kernel's configs. Under the interpreter a single small config without
    BLOCK_N, which the kernel's heuristic sets to the smallest legal chunk (so that tests with
    few blocks still cover several chunks)."""
    if interpret:
        return [TopKConfig({"16bit": TOPK_MAX_K_PAD, "tf32": TOPK_MAX_K_PAD,
                            "ieee": TOPK_MAX_K_PAD}, BLOCK_T=32, BLOCK_D=32, num_warps=1,
                           num_stages=1)]
    return list(_TOPK_CONFIGS)


def topk_dot_kind(x_dtype, precision: str) -> str:
    """"16bit" for bf16/fp16 x, else the fp32 precision ("tf32" or "ieee")."""
    import torch

    return precision if x_dtype in (torch.float32, "fp32") else "16bit"


def topk_keeps(cfg: TopKConfig, kind: str, k_pad: int) -> bool:
    """Whether ``cfg`` runs a top-``k_pad`` selection of dot kind ``kind``: its chunk holds
    K_PAD keys (the chunk top-k needs K_PAD <= BLOCK_N) and its registers the running list."""
    return cfg.kwargs.get("BLOCK_N", k_pad) >= k_pad and cfg.max_k_pad.get(kind, 0) >= k_pad


BLOCK_MEANS_CONFIGS = {  # (BLOCK_G, BLOCK_D) per config; num_stages 1 (no loads to pipeline)
    "gpu": [dict(BLOCK_G=16, BLOCK_D=128, num_warps=4), dict(BLOCK_G=8, BLOCK_D=256, num_warps=4),
            dict(BLOCK_G=32, BLOCK_D=256, num_warps=8)],
    "interpret": [dict(BLOCK_G=8, BLOCK_D=32, num_warps=1)],
}


def block_means_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    """The block-means kernel's configs (no dot: one kind)."""
    rows = BLOCK_MEANS_CONFIGS["interpret" if interpret else "gpu"]
    return [triton.Config({k: v for k, v in r.items() if k != "num_warps"},
                          num_warps=r["num_warps"], num_stages=1) for r in rows]


if __name__ == "__main__":
    print(_table())
