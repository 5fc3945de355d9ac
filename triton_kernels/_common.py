"""What every Triton kernel file (and ``sfnn.ops``) shares: one interpreter flag, one dot helper
that works around the interpreter's bf16 arithmetic, one autotuner unwrap, one device guard,
the dot precision of a dtype and the Triton names of torch dtypes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl

# Whether the kernels run in Triton's interpreter: Triton's own reading of TRITON_INTERPRET, which
# it takes when the kernels are decorated, so this is fixed when the kernel modules are imported.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Triton's interpreter (3.6 and 3.9) multiplies bf16 dot operands as their raw uint16 bits (numpy
# has no bf16), and its fp16 products may round in fp16; under it, and only there, 16-bit dot
# operands are upcast to fp32 (exactly) and multiplied in true fp32, as the tensor cores do.
_UPCAST_16BIT = tl.constexpr(INTERPRET)

# Triton signature names of torch dtypes, for ahead-of-time compilation.
TRITON_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """``tl.dot(a, b, acc, input_precision=DOT_PREC)``; 16-bit operands are upcast to fp32 under
    the interpreter only (see ``_UPCAST_16BIT``)."""
    if _UPCAST_16BIT:
        if a.dtype.primitive_bitwidth == 16:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` inputs.

    fp32 follows ``torch.get_float32_matmul_precision()`` as torch's own matmuls do: "highest"
    means true fp32 products ("ieee"); "high"/"medium" allow tf32. Other dtypes: "tf32" is
    ignored by Triton for 16-bit inputs, which always run on the tensor cores.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def dot_kind(dtype: torch.dtype, precision: str) -> str:
    """Which units run ``tl.dot``: "fma" for true fp32 products (no NVIDIA tensor core offers
    them), "mma" (tensor cores: bf16, fp16, tf32) otherwise."""
    return "fma" if dtype == torch.float32 and precision == "ieee" else "mma"


def unwrap(kernel):
    """The ``@triton.jit`` function under ``triton.autotune`` / ``triton.heuristics`` wrappers
    (under the interpreter, the interpreted function)."""
    while isinstance(kernel, triton.runtime.Autotuner | triton.runtime.Heuristics):
        kernel = kernel.fn
    return kernel


def kernel_parameters(kernel) -> list[tuple[str, bool]]:
    """``(name, is_constexpr)`` of every parameter of a Triton kernel (jitted or interpreted, with
    or without autotune/heuristics wrappers), in order: what the AOT signatures and the autotune
    keys are derived from."""
    fn = unwrap(kernel).fn
    return [(p.name, "constexpr" in str(p.annotation))
            for p in inspect.signature(fn).parameters.values()]


def autotune(configs: list, *, ints=("d_model",), prune=None, restore_value=()):
    """``triton.autotune`` over ``configs``, keyed by the integer arguments ``ints`` and by every
    constexpr parameter of the kernel that no config sets: derived from the kernel's own
    parameter list, so a config tuned for one variant (e.g. tf32) is never reused for another
    (e.g. the FMA path), whatever constexpr a later change adds."""
    tuned = {name for c in configs for name in c.kwargs}

    def decorate(fn):
        key = list(ints) + [n for n, is_c in kernel_parameters(fn) if is_c and n not in tuned]
        return triton.autotune(configs=configs, key=key, restore_value=list(restore_value),
                               prune_configs_by={"early_config_prune": prune} if prune else None
                               )(fn)

    return decorate


def device_guard(tensor: torch.Tensor):
    """A context making ``tensor``'s CUDA device current, so that a Triton launch (which runs on
    the current device and its current stream) runs where the tensors are; a no-op for CPU
    tensors (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator for host launchers: runs ``launcher`` under :func:`device_guard` of its first
    argument (a tensor). Marks the wrapper with ``device_guarded = True`` (tested)."""

    @functools.wraps(launcher)
    def wrapper(first, *args, **kwargs):
        with device_guard(first):
            return launcher(first, *args, **kwargs)

    wrapper.device_guarded = True
    return wrapper
