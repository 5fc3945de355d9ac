"""The optional CUDA C++ extension ``sfnn._C``: decoding kernels (csrc/decode.cu).

Three ops, registered by the extension in the ``sfnn`` namespace for CUDA tensors, each one
launch (plus a 16-byte memset) with no host synchronisation, so they can be captured in a CUDA
graph. ``kbar`` (the cached block means) may be float32 or bfloat16; ``bbar`` is float32.

- ``sfnn::decode_select(x, kbar, bbar, top_k) -> int32 (T, top_k)``: Avg-K scores against the
  cached block means and top-K, best first, ties to the smaller block index.
- ``sfnn::decode_ffn(x, keys, values, indices, key_bias, out_bias, gates, block_size,
  activation) -> (T, d_model)``: the block FFN over the given blocks, reading each distinct
  selected block's key and value rows once. Forward only.
- ``sfnn::decode_step(x, kbar, bbar, keys, values, key_bias, out_bias, top_k, block_size,
  activation) -> (y (T, d_model), indices int32 (T, top_k))``: both in one launch, the decode
  step of :func:`sfnn.sparse_ffn` with cached block means. Forward only.

The extension is imported lazily, on the first question about it, and the package works without
it. Build it on a machine with a CUDA build of torch and nvcc::

    SFNN_BUILD_CUDA=1 pip install --no-build-isolation -e .

Example (with the extension built)::

    >>> idx = sfnn.cuda_ext.decode_select(x2d, kbar, bbar, top_k=8)         # (T, 8) int32
    >>> y = sfnn.cuda_ext.decode_ffn(x2d, keys, values, idx, None, None, None,
    ...                              block_size=64, activation="relu")       # (T, d_model)
    >>> y, idx = sfnn.cuda_ext.decode_step(x2d, kbar.bfloat16(), bbar, keys, values, None,
    ...                                    None, top_k=8, block_size=64, activation="relu")
"""
from __future__ import annotations

import functools

import torch

from . import _build

Tensor = torch.Tensor

BUILD_COMMAND = "SFNN_BUILD_CUDA=1 pip install --no-build-isolation -e ."


@functools.cache
def _load() -> str | None:
    """Import ``sfnn._C`` once; None on success, else why it is not usable."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build, so the CUDA extension sfnn._C "
                f"cannot exist here; install a CUDA build of torch, then build it with "
                f"`{BUILD_COMMAND}` (needs nvcc)")
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as err:
        why = _build.recorded_reason()  # setup.py's reason for skipping it, if recorded
        return (f"the CUDA extension sfnn._C is not built ({f'setup.py: {why}' if why else err}); "
                f"build it on a machine with a CUDA build of torch and nvcc with `{BUILD_COMMAND}`")
    except OSError as err:  # present but unloadable (ABI/CUDA mismatch)
        return (f"the CUDA extension sfnn._C failed to load ({err}); rebuild it against the "
                f"installed torch with `{BUILD_COMMAND}`")
    if not all(hasattr(torch.ops.sfnn, op) for op in ("decode_select", "decode_ffn",
                                                       "decode_step")):
        return (f"sfnn._C loaded but did not register sfnn::decode_select/decode_ffn/decode_step "
                f"(built from older sources?); rebuild it with `{BUILD_COMMAND}`")
    _register_fakes()
    return None


def available() -> bool:
    """True when the CUDA extension is built and loaded."""
    return _load() is None


def unavailable_reason() -> str:
    """Why the CUDA extension cannot be used, and how to build it ("" when it can)."""
    return _load() or ""


def supports_device(device: torch.device | str | int) -> bool:
    """True when the extension's kernels can run on ``device``: a CUDA GPU whose compute
    capability has machine code in it or takes its PTX (``sfnn._build.runs_on``: today 8.x, 9.0
    and later). False for other devices. Says nothing of whether the extension is built."""
    return device_unsupported_reason(device) is None


def device_unsupported_reason(device: torch.device | str | int) -> str | None:
    """None when the extension's kernels can run on ``device`` (see :func:`supports_device`),
    else why not."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the CUDA extension runs on CUDA GPUs only (got device {device})"
    index = torch.cuda.current_device() if device.index is None else device.index
    cap = _capability(index)
    if _build.runs_on(cap):
        return None
    targets = ", ".join(f"sm_{a}" for a in _build.SASS_ARCHS)
    return (f"the CUDA extension sfnn._C holds machine code for {targets} and PTX for "
            f"compute_{_build.PTX_ARCH}, none of which runs on {device} (compute capability "
            f"{cap[0]}.{cap[1]}); use backend='triton' or 'torch'")


@torch.compiler.assume_constant_result  # under torch.compile: read while tracing, a constant
def _capability(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return major, minor


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)


def _register_fakes() -> None:
    """Fake (meta) kernels, so torch.compile can trace the ops; only once the library loaded."""

    @torch.library.register_fake("sfnn::decode_select")
    def _decode_select_fake(x, kbar, bbar, top_k):
        torch._check(x.dim() == 2, lambda: "sfnn::decode_select: x must be 2-D")
        return x.new_empty((x.shape[0], top_k), dtype=torch.int32)

    @torch.library.register_fake("sfnn::decode_ffn")
    def _decode_ffn_fake(x, keys, values, indices, key_bias, out_bias, gates, block_size,
                         activation, gate_keys=None, gate_bias=None):
        torch._check(x.dim() == 2, lambda: "sfnn::decode_ffn: x must be 2-D")
        return x.new_empty(x.shape)

    @torch.library.register_fake("sfnn::decode_step")
    def _decode_step_fake(x, kbar, bbar, keys, values, key_bias, out_bias, top_k, block_size,
                          activation):
        torch._check(x.dim() == 2, lambda: "sfnn::decode_step: x must be 2-D")
        return x.new_empty(x.shape), x.new_empty((x.shape[0], top_k), dtype=torch.int32)


def decode_select(x2d: Tensor, kbar: Tensor, bbar: Tensor | None, top_k: int) -> Tensor:
    """The ``top_k`` Avg-K blocks per token, best first (ties to the smaller index).

    x2d: (T, d_model) float32/float16/bfloat16 CUDA; kbar: (n_blocks, d_model) float32 or
    bfloat16 (scores use its values as stored); bbar: (n_blocks,) float32 or None.
    Returns (T, top_k) int32.
    """
    _require()
    return torch.ops.sfnn.decode_select(x2d, kbar, bbar, int(top_k))


def decode_ffn(
    x2d: Tensor,
    keys: Tensor,
    values: Tensor,
    indices: Tensor,
    key_bias: Tensor | None,
    out_bias: Tensor | None,
    gates: Tensor | None,
    *,
    block_size: int,
    activation: str,
    gate_keys: Tensor | None = None,
    gate_bias: Tensor | None = None,
) -> Tensor:
    """The block FFN over ``indices`` for a few tokens (forward only), in x2d's dtype.

    x2d: (T, d_model); keys, values: (d_ff, d_model) of x2d's dtype; indices: (T, top_k) int32;
    key_bias: (d_ff,) or None; out_bias: (d_model,) or None; gates: (T, top_k) float32 or None.
    Gated FFN (issue 11): ``gate_keys`` (d_ff, d_model) and ``gate_bias`` (d_ff,) or None make
    each row's activation ``act(x . gate_keys + gate_bias) * (x . keys + key_bias)``.
    """
    _require()
    return torch.ops.sfnn.decode_ffn(x2d, keys, values, indices, key_bias, out_bias, gates,
                                     int(block_size), str(activation), gate_keys, gate_bias)


def decode_step(
    x2d: Tensor,
    kbar: Tensor,
    bbar: Tensor | None,
    keys: Tensor,
    values: Tensor,
    key_bias: Tensor | None,
    out_bias: Tensor | None,
    *,
    top_k: int,
    block_size: int,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """Select and compute in one launch: ``(y, indices)`` as ``decode_select`` followed by
    ``decode_ffn`` (no gates) would give them, bitwise.

    x2d: (T, d_model) float32/float16/bfloat16 CUDA; kbar: (n_blocks, d_model) float32 or
    bfloat16 with n_blocks = d_ff // block_size; bbar: (n_blocks,) float32 or None; keys,
    values: (d_ff, d_model) of x2d's dtype; key_bias: (d_ff,) or None; out_bias: (d_model,) or
    None. Returns y (T, d_model) in x2d's dtype and indices (T, top_k) int32, best first.
    """
    _require()
    return torch.ops.sfnn.decode_step(x2d, kbar, bbar, keys, values, key_bias, out_bias,
                                      int(top_k), int(block_size), str(activation))
