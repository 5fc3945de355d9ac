"""The CPU kernel of the torch backend (sfnn/cpu_kernel.cpp), built just in time.

The block FFN forward and backward in one parallel region per call, instead of a loop of small
ATen ops per block (each its own OpenMP region and barrier): the torch path's speed then holds
on a machine shared with other busy processes. Built on first use with
``torch.utils.cpp_extension.load`` (cached in torch's extension directory, so later processes
only load it) where a C++ compiler and ninja are present; otherwise the torch backend keeps its
pure-PyTorch path. ``SFNN_CPU_KERNEL=0`` turns the kernel off, ``=1`` makes its absence an
error.

    >>> sfnn.cpu_kernel.available()          # builds (once) or loads it
    True
    >>> sfnn.cpu_kernel.unavailable_reason()
    ''
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
ENV = "SFNN_CPU_KERNEL"


def _mode() -> str:
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return "off"
    if flag in ("1", "true", "on", "yes"):
        return "on"
    return "auto"


@functools.cache
def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags ("" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return ""
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _cflags() -> list[str]:
    """-O3, and on x86-64 Linux the build machine's vector instructions (-march=native: the
    gather, scatter and decode loops are plain C++). The build name includes the CPU's flags,
    so a shared cache never hands the build to another kind of CPU."""
    flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_identity():
        flags.append("-march=native")
    return flags + _openmp_flags()


def _openmp_flags() -> list[str]:
    """-fopenmp where torch runs on OpenMP (its Linux wheels, with libgomp): ``at::parallel_for``
    is inline in ATen's headers and runs its range serially in a translation unit compiled
    without OpenMP, which would make the kernel's "one parallel region" one thread. Elsewhere
    (macOS clang, a torch without OpenMP) none: the kernel then runs on one thread."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _openmp_ldflags() -> list[str]:
    """Link the OpenMP runtime torch itself loaded: the libgomp that its wheels carry in
    ``torch/lib`` (named by path, whatever its soname: older wheels renamed it), so the loader
    reuses torch's thread pool instead of starting a second runtime; else the compiler's."""
    if not _openmp_flags():
        return []
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return [str(bundled[0])] if bundled else ["-fopenmp"]


def _name() -> str:
    """The build's name: changes with the source, torch, Python, the flags and the CPU, so a
    stale or foreign build is never loaded."""
    key = (SOURCE.read_bytes() + torch.__version__.encode() + sys.version.encode()
           + " ".join(_cflags() + _openmp_ldflags()).encode() + _cpu_identity().encode())
    return "sfnn_cpu_" + hashlib.sha256(key).hexdigest()[:12]


@functools.cache
def _load() -> str | None:
    """Build or load the kernel once; None on success, else why it is not usable."""
    if _mode() == "off":
        return f"{ENV}=0 turned the CPU kernel off"
    if not SOURCE.exists():
        return f"the kernel source {SOURCE} is missing from this installation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH) to build the CPU kernel"
    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except Exception:  # noqa: BLE001 - ninja missing or broken
        return "ninja is not installed (pip install ninja) to build the CPU kernel"
    name = _name()
    try:
        cached = (Path(cpp_extension._get_build_directory(name, verbose=False))
                  / f"{name}.so").exists()
    except Exception:  # noqa: BLE001 - a private helper; only decides whether to warn
        cached = False
    if not cached:
        warnings.warn("sfnn: building the CPU kernel (first use on this machine only, about a "
                      f"minute; {ENV}=0 skips it)", stacklevel=3)
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=_cflags(),
                           extra_ldflags=_openmp_ldflags(),
                           is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means "use the torch path"
        return f"building the CPU kernel failed: {type(err).__name__}: {str(err)[-2000:]}"
    if not hasattr(torch.ops.sfnn_cpu, "block_ffn_fwd"):
        return "the CPU kernel loaded but did not register sfnn_cpu::block_ffn_fwd"
    if torch.get_num_threads() > 1 and region_threads() == 1:
        warnings.warn("sfnn: the CPU kernel was built without OpenMP and runs on one thread "
                      f"of {torch.get_num_threads()}; {ENV}=0 uses the multi-threaded "
                      "pure-PyTorch path instead", stacklevel=3)
    return None


def available() -> bool:
    """True when the kernel is built (building it on first call) and loaded. Raises when
    ``SFNN_CPU_KERNEL=1`` and it cannot be."""
    reason = _load()
    if reason is not None and _mode() == "on":
        raise RuntimeError(f"{ENV}=1 but {reason}")
    return reason is None


def unavailable_reason() -> str:
    """Why the kernel cannot be used ("" when it can)."""
    return _load() or ""


def avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias, *, top_k: int,
                 block_size: int, activation: str, gate_keys=None, gate_bias=None):
    """``(y, indices)``: :func:`select_blocks` then :func:`block_ffn_fwd` (no gates, nothing
    saved) in one call, for inference. Shapes as there; indices int32 (T, top_k)."""
    _require()
    return torch.ops.sfnn_cpu.avgk_ffn_fwd(x2d, kbar, bbar, keys, values, key_bias, out_bias,
                                           int(top_k), int(block_size), str(activation),
                                           gate_keys, gate_bias)


def region_threads() -> int:
    """How many threads one of the kernel's parallel regions runs on: ``torch.get_num_threads()``
    when the build has OpenMP (every Linux build of a torch that uses OpenMP), 1 without it."""
    return int(torch.ops.sfnn_cpu.region_threads())


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(reason)


def block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias, gates, *, block_size: int,
                  activation: str, save_for_backward: bool, gate_keys=None, gate_bias=None):
    """``(y, saved)``: the torch backend's forward (see :mod:`sfnn.ops`) in one call.

    x2d: (T, d_model); keys, values: (d_ff, d_model); indices: int32 (T, top_k); key_bias:
    (d_ff,) or None; out_bias: (d_model,) or None; gates: (T, top_k) or None. y is (T, d_model)
    in x2d's dtype; saved holds the selected pre-activations (T * top_k, block_size) in block
    order when ``save_for_backward`` (else it is empty). Bitwise repeatable run to run for a
    given thread count: the threads claim tasks as they come (a thread the OS deschedules
    before it claims one leaves its task to the others), but a task's blocks and accumulator
    are fixed.

    Gated FFN (PLAN.md's protocol): ``gate_keys`` (d_ff, d_model) and ``gate_bias`` (d_ff,) or
    None make ``h = act(x kg^T + gate_bias) * (x keys^T + key_bias)``; saved rows are then
    ``[A_gate | A_up]``, (T * top_k, 2 * block_size).
    """
    _require()
    return torch.ops.sfnn_cpu.block_ffn_fwd(x2d, keys, values, indices, key_bias, out_bias,
                                            gates, int(block_size), str(activation),
                                            bool(save_for_backward), gate_keys, gate_bias)


def block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates, saved, *, block_size: int,
                  activation: str, needs, gate_keys=None, gate_bias=None):
    """``(dx, dkeys, dvalues, dkey_bias, dgates)``, the torch backend's backward in one call,
    plus ``(dgate_keys, dgate_bias)`` when ``needs`` holds 7 flags (``ops.GRAD_NAMES`` of a
    gated layer); a gradient not in ``needs`` (or of an absent input) is None.
    Repeatable as :func:`block_ffn_fwd`; ``gate_keys``/``gate_bias`` as there (then ``saved`` is
    the gated forward's)."""
    _require()
    needs = [bool(n) for n in needs]
    if len(needs) not in (5, 7):
        raise ValueError(f"needs must hold 5 or 7 flags, got {len(needs)}")
    outs = torch.ops.sfnn_cpu.block_ffn_bwd(dy, x2d, keys, values, indices, key_bias, gates,
                                            saved, int(block_size), str(activation), needs,
                                            gate_keys, gate_bias)
    present = (True, True, True, key_bias is not None, gates is not None,
               gate_keys is not None, gate_bias is not None)[:len(needs)]
    return tuple(o if (n and p) else None for o, n, p in zip(outs, needs, present, strict=False))


def select_blocks(x2d, kbar, bbar, top_k: int):
    """int32 (T, top_k): the torch path's selection (same packed keys, same ties) in one
    parallel region: per chunk of tokens a score GEMM and a partial sort per token. x2d: (T,
    d_model) float32/float16/bfloat16 (float64 stays on the torch path); kbar: (n_blocks,
    d_model); bbar: (n_blocks,) or None."""
    _require()
    return torch.ops.sfnn_cpu.select_blocks(x2d, kbar, bbar, int(top_k))
