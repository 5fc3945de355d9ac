"""Small pieces shared by the Triton kernel files: dtype names, dot precision, AOT specs."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

# Triton signature names of torch dtypes, for ahead-of-time compilation.
TRITON_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` inputs.

    fp32 follows ``torch.get_float32_matmul_precision()`` as torch's own matmuls do: "highest"
    means true fp32 products ("ieee"); "high"/"medium" allow tf32. Other dtypes: "tf32" is
    ignored by Triton for 16-bit inputs, which always run on the tensor cores.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One kernel variant to compile ahead of time (bench/aot_check.py).

    name: a readable id, e.g. "block_ffn_fwd[bf16,BT=64,g=64]";
    kernel: the @triton.jit function (unwrapped from autotune/heuristics);
    signature: argument name -> Triton type ("*bf16", "i32", "constexpr", ...);
    constexprs: argument name -> value, for every constexpr argument;
    is_gemm: True when the kernel's main work is tl.dot (checked for HGMMA on sm_90);
    num_warps, num_stages, maxnreg: the launch options of the tuning config (maxnreg: the
    register limit per thread, None for the compiler's choice).
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    is_gemm: bool
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None
