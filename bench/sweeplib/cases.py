"""Benchmark cases and presets: what the sweep measures.

A :class:`Case` is one problem (tokens, d_model, d_ff, block_size, top_k, dtype, activation,
mode) and the providers to time on it; a preset is a function ``device -> list[Case]``. To add a
measurement, add a case to a preset here, not a flag.
"""
from __future__ import annotations

import dataclasses

MODES = ("forward", "backward", "forward+backward", "decode")
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem; every provider in ``providers`` is timed on it, interleaved."""

    tokens: int
    d_model: int
    d_ff: int
    block_size: int
    top_k: int
    mode: str
    dtype: str = "float32"
    activation: str = "gelu"
    providers: tuple = ("dense", "torch", "triton", "cuda")
    tag: str = ""
    min_reps: int = 5  # CPU: timed rounds at least (more when they fit the per-case budget)
    contention: int = 0  # CPU-bound processes running while it is timed (contention.py)
    gated: bool = False  # a gated FFN (issue 11): "dense" is then the dense gated FFN

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size

    @property
    def density(self) -> float:
        return self.top_k * self.block_size / self.d_ff

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if self.d_ff % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide d_ff {self.d_ff}")
        if not 1 <= self.top_k <= self.n_blocks:
            raise ValueError(f"top_k {self.top_k} not in [1, n_blocks={self.n_blocks}]")
        from .providers import PROVIDERS

        unknown = set(self.providers) - set(PROVIDERS)
        if unknown:
            raise ValueError(f"unknown providers {sorted(unknown)}")


def top_k_for(d_ff: int, block_size: int, density: float) -> int | None:
    """The top_k giving ``density`` exactly, or None when it is not a whole number >= 1."""
    k = density * d_ff / block_size
    if k < 1 or abs(k - round(k)) > 1e-9 or d_ff % block_size:
        return None
    return int(round(k))


def grid(tokens, d_models, ffn_mult, block_sizes, densities, modes, **kw) -> list:
    """Every valid case of a cartesian grid; d_ff = ffn_mult * d_model."""
    cases = []
    for mode in modes:
        for t in tokens:
            for d in d_models:
                for g in block_sizes:
                    for rho in densities:
                        k = top_k_for(ffn_mult * d, g, rho)
                        if k is not None:
                            cases.append(Case(t, d, ffn_mult * d, g, k, mode, **kw))
    return cases


# The paper's selection methods (issue 10) beside Avg-K on the torch path.
SELECTION_PROVIDERS = ("torch", "switch", "moe", "hash", "random")

ACCEPTANCE = dict(tokens=4096, d_model=512, d_ff=8192, block_size=64, top_k=16, dtype="float32",
                  activation="gelu")
# Issue 11: the gated FFN (SwiGLU) at the acceptance shape, against the dense gated FFN.
GATED_ACCEPTANCE = {**ACCEPTANCE, "activation": "silu", "gated": True}


def preset_default(device: str) -> list:
    """The README's main job. On CPU the lead's acceptance shape comes first (torch vs dense,
    forward and forward+backward), then density and block-size sweeps around it (<= 4 min on
    2 cores). On CUDA a bf16 headline shape with the same sweeps, decode, and fp32."""
    if device == "cpu":
        cases = [Case(**ACCEPTANCE, mode=m, providers=("dense", "torch"), tag="acceptance",
                      min_reps=7, contention=busy)
                 for busy in (0, 1) for m in ("forward", "forward+backward")]
        shape = dict(tokens=4096, d_model=512, d_ff=8192, dtype="float32", activation="gelu")
        for mode in ("forward", "forward+backward"):
            for g, k in ((64, 32), (64, 8), (32, 32), (128, 8)):  # 1/4, 1/16; g=32, 128 at 1/8
                cases.append(Case(**shape, block_size=g, top_k=k, mode=mode,
                                  providers=("dense", "torch"), min_reps=3))
        cases.append(Case(**ACCEPTANCE, mode="forward", providers=("dense", "naive", "torch"),
                          min_reps=3))
        for mode in ("forward", "forward+backward"):  # issue 10: selection cost beside Avg-K
            cases.append(Case(**ACCEPTANCE, mode=mode, providers=SELECTION_PROVIDERS,
                              tag="selection", min_reps=3))
        for t in (1, 8):
            cases.append(Case(t, 512, 8192, 64, 16, "decode",
                              providers=("dense", "naive", "gather", "torch")))
        for mode in ("forward", "forward+backward"):  # issue 11: the gated row
            cases.append(Case(**GATED_ACCEPTANCE, mode=mode, providers=("dense", "torch"),
                              tag="gated-acceptance", min_reps=3))
        return cases
    # GPU: ordered by value per second, as --max-minutes may cut the tail. Each new block size
    # or dtype costs Triton autotuning (compiles), so the g=64 bf16 cases come first.
    head = dict(d_model=2048, d_ff=8192, dtype="bfloat16", activation="gelu")
    every = ("dense", "naive", "torch", "triton", "cuda")
    fast = ("dense", "torch", "triton")
    train = ("forward", "forward+backward")
    cases = [Case(4096, **head, block_size=64, top_k=16, mode=m, providers=every, tag="headline")
             for m in ("forward", "backward", "forward+backward")]
    for t in (1, 8):
        cases.append(Case(t, **head, block_size=64, top_k=16, mode="decode",
                          providers=("dense", "naive", "gather", "torch", "triton", "cuda")))
    for mode in train:
        for rho in (1 / 4, 1 / 16, 1 / 32):
            cases.append(Case(4096, **head, block_size=64, top_k=top_k_for(8192, 64, rho),
                              mode=mode, providers=fast))
    for mode in train:
        cases.append(Case(16384, **head, block_size=64, top_k=16, mode=mode, providers=fast))
    for g in (16, 32, 128, 256):
        for mode in train:
            cases.append(Case(4096, **head, block_size=g, top_k=top_k_for(8192, g, 1 / 8),
                              mode=mode, providers=fast))
    cases.append(Case(4096, 2048, 8192, 64, 16, "forward", dtype="float32", activation="gelu",
                      providers=fast))
    for mode in ("forward", "forward+backward"):
        cases.append(Case(**{**ACCEPTANCE, "dtype": "bfloat16"}, mode=mode,
                          providers=("triton",) + SELECTION_PROVIDERS[1:], tag="selection"))
    return cases


def preset_quick(device: str) -> list:
    """Densities 1/4, 1/8, 1/16 x block sizes 32, 64, 128, forward and forward+backward
    (under 2 minutes on a 2-core CPU)."""
    if device == "cpu":
        return grid([2048], [512], 8, [32, 64, 128], [1 / 4, 1 / 8, 1 / 16],
                    ["forward", "forward+backward"], providers=("dense", "torch"))
    return grid([4096], [2048], 4, [32, 64, 128], [1 / 4, 1 / 8, 1 / 16],
                ["forward", "forward+backward"], dtype="bfloat16",
                providers=("dense", "torch", "triton", "cuda"))


def preset_smoke(device: str) -> list:
    """Seconds: tiny shapes, every mode, every provider that can run (used by the tests);
    just enough points for both plots to draw lines."""
    every = ("dense", "naive", "gather", "torch", "triton", "cuda")
    tiny = dict(tokens=64, d_model=64, d_ff=256, providers=every, min_reps=3)
    cases = [Case(**tiny, block_size=g, top_k=k, mode="forward")
             for g, k in ((16, 4), (16, 2), (32, 2), (32, 1))]
    cases += [Case(**tiny, block_size=16, top_k=k, mode="forward+backward") for k in (4, 2)]
    cases.append(Case(**tiny, block_size=16, top_k=4, mode="backward"))
    cases.append(Case(4, 64, 256, 16, 2, "decode", activation="relu", providers=every,
                      min_reps=3))
    return cases


def preset_full(device: str) -> list:
    """The whole grid (meant for a GPU): tokens x d_model x block size x density x mode."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    every = ("dense", "naive", "torch", "triton", "cuda")
    cases = grid([512, 4096, 16384], [512, 1024, 2048, 4096], 4, [16, 32, 64, 128, 256],
                 [1 / 4, 1 / 8, 1 / 16, 1 / 32], ["forward", "backward", "forward+backward"],
                 dtype=dtype, providers=every)
    cases += grid([1, 8], [512, 1024, 2048, 4096], 4, [16, 32, 64, 128, 256],
                  [1 / 4, 1 / 8, 1 / 16, 1 / 32], ["decode"], dtype=dtype,
                  providers=every[:2] + ("gather",) + every[2:])
    return cases


def preset_decode(device: str) -> list:
    """Decoding (issue 12): one token at d_model 4096 (d_ff 16384, g 64, top_k 32) and at the
    acceptance shape's d_model 512 (d_ff 8192, g 64, top_k 16), fp32 and bf16, then 2..16
    tokens at d_model 512 (where the few-token path stops paying: torch_path.FEW_TOKENS). On
    the CPU ``torch`` is the CPU kernel when it is built and ``torch-nokernel`` the pure-PyTorch
    fallback (the few-token path up to FEW_TOKENS tokens, the grouped loop beyond); on CUDA the
    extension and Triton."""
    if device == "cpu":
        every = ("dense", "gather", "torch", "torch-nokernel")
        cases = []
        for d, d_ff, k in ((4096, 16384, 32), (512, 8192, 16)):
            for dtype in ("float32", "bfloat16"):
                cases.append(Case(1, d, d_ff, 64, k, "decode", dtype=dtype, providers=every,
                                  tag=f"decode-d{d}"))
        for t in (2, 4, 8, 16):
            cases.append(Case(t, 512, 8192, 64, 16, "decode", providers=every))
        return cases
    every = ("dense", "gather", "torch", "triton", "cuda")
    return [Case(t, d, d_ff, 64, k, "decode", dtype=dtype, providers=every,
                 tag=f"decode-d{d}" if t == 1 else "")
            for d, d_ff, k in ((4096, 16384, 32), (512, 8192, 16))
            for dtype in ("bfloat16", "float32") for t in (1, 8)]


def preset_gated(device: str) -> list:
    """Gated FFNs (issue 11): the SwiGLU layer against the dense gated FFN
    (``down(silu(gate(x)) * up(x))``), forward and forward+backward. On the CPU at the
    acceptance shape, idle and with one busy process (targets >= 3x and >= 2.5x), the torch
    path with its CPU kernel (``torch``) and without (``torch-nokernel``: the chunked
    pure-PyTorch path); on CUDA in
    bf16 at the headline shape (Triton has no gated path yet: it is skipped with the reason)."""
    train = ("forward", "forward+backward")
    if device == "cpu":
        return [Case(**GATED_ACCEPTANCE, mode=m, providers=("dense", "torch", "torch-nokernel"),
                     tag="gated-acceptance", min_reps=7, contention=busy)
                for busy in (0, 1) for m in train]
    return [Case(4096, 2048, 8192, 64, 16, m, dtype="bfloat16", activation="silu", gated=True,
                 providers=("dense", "torch", "triton"), tag="gated") for m in train]


PRESETS = {"default": preset_default, "quick": preset_quick, "smoke": preset_smoke,
           "full": preset_full, "decode": preset_decode, "gated": preset_gated}

