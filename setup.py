"""Build script for sfnn.

The Python package always installs. The CUDA C++ extension ``sfnn._C`` (csrc/) needs torch at
build time, so it is built only with ``pip install --no-build-isolation``:

- ``SFNN_BUILD_CUDA`` unset: built when torch has CUDA and the CUDA toolkit torch finds is whole
  (nvcc and headers, torch's CUDA major version); otherwise, or if the build fails, the install
  goes on without it, with a warning that says why (``pip install -v`` shows it; afterwards
  ``sfnn.cuda_ext.unavailable_reason()`` says it too).
- ``SFNN_BUILD_CUDA=1``: built, or the install fails saying why.
- ``SFNN_BUILD_CUDA=0``: not built.

The rules, targets and flags live in sfnn/_build.py, shared with the tests.
"""
from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_helper():
    # sfnn is not importable before it is installed: load the one module by its path.
    spec = importlib.util.spec_from_file_location("_sfnn_build", os.path.join(HERE, "sfnn",
                                                                               "_build.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_build = _load_build_helper()
# The outcome of this install, recorded beside the package for sfnn.cuda_ext to read.
OUTCOME = {"built": False, "reason": ""}
_RECORD_DIRS: list[tuple[str, bool]] = []


def _record(built: bool, reason: str) -> None:
    OUTCOME.update(built=built, reason=reason)
    for package_dir, editable in _RECORD_DIRS:
        # A record in the source tree speaks for the environment that installed it only (other
        # venvs may install the same tree, e.g. tests/test_install_layout.py).
        _build.write_record(package_dir, built=built, reason=reason,
                            prefix=sys.prefix if editable else None)


def _record_dir(cmd, editable: bool) -> tuple[str, bool]:
    # Editable installs import sfnn from the source tree; others from what build_lib holds.
    return (os.path.join(HERE, "sfnn") if editable else os.path.join(cmd.build_lib, "sfnn"),
            editable)


class BuildPy(build_py):
    def run(self):
        super().run()
        _RECORD_DIRS.append(_record_dir(self, getattr(self, "editable_mode", False)))
        _record(OUTCOME["built"], OUTCOME["reason"])


def _cuda_extension_kwargs() -> dict:
    """setup()'s ext_modules and cmdclass: the CUDA extension when it is to be built, and in any
    case the build_py that records the outcome beside the package."""
    ext = _extension()
    return {"ext_modules": ext.get("ext_modules", []),
            "cmdclass": {"build_py": BuildPy, **ext.get("cmdclass", {})}}


def _extension() -> dict:
    """ext_modules and cmdclass for the CUDA extension, or {} when it is not to be built."""
    flag = os.environ.get(_build.ENV_FLAG)
    try:
        import torch
    except ImportError:
        torch = None
    cuda_home = None
    if torch is not None and torch.version.cuda is not None:
        from torch.utils.cpp_extension import CUDA_HOME as cuda_home
    decision = _build.decide(flag, None if torch is None else torch.__version__,
                             None if torch is None else torch.version.cuda, cuda_home)
    if not decision.build:
        if decision.warn:
            _build.warn(decision.reason)
        OUTCOME.update(built=False, reason=decision.reason)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    OUTCOME.update(built=True, reason="")
    build_ext = _build.guarded_build_ext(BuildExtension.with_options(use_ninja=True),
                                         forced=flag == "1",
                                         on_failure=lambda reason: _record(False, reason))

    class BuildExt(build_ext):
        def run(self):
            _RECORD_DIRS.append(_record_dir(self, self.inplace))
            super().run()

    return {"ext_modules": [CUDAExtension(**_build.extension_spec(HERE))],
            "cmdclass": {"build_ext": BuildExt}}


setup(
    # Our Triton kernels live in triton_kernels/ but install as sfnn.triton_kernels: a top-level
    # "triton_kernels" would collide with Triton's own MoE kernel package.
    packages=["sfnn", "sfnn.triton_kernels"],
    package_dir={"sfnn": "sfnn", "sfnn.triton_kernels": "triton_kernels"},
    # The CPU kernel's source, built just in time on the user's machine (sfnn/cpu_kernel.py).
    package_data={"sfnn": ["cpu_kernel.cpp"]},
    **_cuda_extension_kwargs(),
)
