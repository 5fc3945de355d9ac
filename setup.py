"""Build script for sfnn.

The Python package always installs. The CUDA C++ extension ``sfnn._C`` (csrc/) is built only
where it can be: torch built with CUDA and nvcc found. ``SFNN_BUILD_CUDA=1`` forces the build
(failing loudly if impossible), ``SFNN_BUILD_CUDA=0`` skips it. Because it needs torch at build
time, build it with ``pip install --no-build-isolation``.
"""
from __future__ import annotations

import glob
import os
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
NVCC_ARCH_FLAGS = [
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90,code=sm_90",
]


def _cuda_extension_kwargs() -> dict:
    """ext_modules/cmdclass for the CUDA extension, or {} when it is not to be built."""
    flag = os.environ.get("SFNN_BUILD_CUDA", "").strip()
    if flag == "0":
        return {}
    forced = flag == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        if forced:
            raise RuntimeError("SFNN_BUILD_CUDA=1 but torch is not importable at build time; "
                               "install torch first and use --no-build-isolation") from err
        return {}
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is built without CUDA"
    elif CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    if reason is not None:
        if forced:
            raise RuntimeError(f"SFNN_BUILD_CUDA=1 but {reason}")
        if flag or torch.version.cuda is not None:
            warnings.warn(f"sfnn: skipping the CUDA extension: {reason}", stacklevel=1)
        return {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))
                     + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return {}
    ext = CUDAExtension(
        name="sfnn._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std flag: torch's BuildExtension picks the standard its headers need (C++20 from
        # torch 2.13 on); forcing c++17 breaks the build against newer torch.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *NVCC_ARCH_FLAGS]},
    )
    build_ext = BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


setup(
    # Our Triton kernels live in triton_kernels/ but install as sfnn.triton_kernels: a top-level
    # "triton_kernels" would collide with Triton's own MoE kernel package.
    packages=["sfnn", "sfnn.triton_kernels"],
    package_dir={"sfnn": "sfnn", "sfnn.triton_kernels": "triton_kernels"},
    # The CPU kernel's source, built just in time on the user's machine (sfnn/cpu_kernel.py).
    package_data={"sfnn": ["cpu_kernel.cpp"]},
    **_cuda_extension_kwargs(),
)
