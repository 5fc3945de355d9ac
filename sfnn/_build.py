"""How the CUDA extension ``sfnn._C`` is built, in one place for setup.py, the compile checks in
tests/ and the runtime's device check (:func:`runs_on`).

setup.py loads this file by its path (the package cannot be imported before it is installed), so
it imports nothing from sfnn, and torch and setuptools only inside functions.

- What is compiled: :func:`extension_spec` (sources, include dirs, our flags, the targets).
- For which GPUs: machine code for :data:`SASS_ARCHS` and PTX for the newest of them, which the
  driver compiles for any later GPU (:func:`nvcc_arch_flags`, :func:`runs_on`).
- With which flags: torch's ``BuildExtension`` adds the C++ standard its headers need (C++20 from
  torch 2.13 on) and other version-dependent flags. :func:`torch_cxx_command` asks it for the
  exact g++ line of a source; :func:`nvcc_flags` gives nvcc the same standard plus torch's
  ``COMMON_NVCC_FLAGS``, as ``BuildExtension`` does.
- Whether to build (``SFNN_BUILD_CUDA`` unset, ``1`` or ``0``): :func:`decide`, which probes the
  CUDA toolkit torch would use (nvcc, the headers and the CUDA version, of one toolkit) before
  anything is compiled, and :func:`guarded_build_ext`, which turns a failed build into a warning
  unless the build was asked for. The outcome is recorded next to the package
  (:func:`write_record`), so that ``sfnn.cuda_ext.unavailable_reason()`` can say why.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

EXT_NAME = "sfnn._C"
# Machine code (SASS) for these compute capabilities; PTX for the newest, so that later GPUs
# (Blackwell sm_100/sm_120, ...) JIT-compile the kernels instead of failing with "no kernel image".
SASS_ARCHS = (80, 90)
PTX_ARCH = max(SASS_ARCHS)
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3",)
ENV_FLAG = "SFNN_BUILD_CUDA"
BUILD_COMMAND = f"{ENV_FLAG}=1 pip install --no-build-isolation -e ."
RECORD_NAME = "_build_record.json"
# Where a CUDA toolkit usually is, after CUDA_HOME and the nvcc on the PATH (glob patterns).
TOOLKIT_GUESSES = ("/usr/local/cuda", "/usr/local/cuda-*")
HERE = os.path.dirname(os.path.abspath(__file__))


def nvcc_arch_flags() -> list[str]:
    """nvcc's targets: SASS for each of :data:`SASS_ARCHS`, PTX for :data:`PTX_ARCH`."""
    flags = []
    for arch in SASS_ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags + ["-gencode", f"arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}"]


def runs_on(capability: tuple[int, int]) -> bool:
    """True when a GPU of compute capability ``(major, minor)`` can run the extension's kernels.

    Machine code for sm_XY runs on X.Y and later minor versions of the same major one (sm_80 on
    8.6 and 8.9); PTX for compute_XY is compiled by the driver for X.Y and every later capability.
    """
    major, minor = (int(v) for v in capability)
    if any(arch // 10 == major and arch % 10 <= minor for arch in SASS_ARCHS):
        return True
    return (major, minor) >= divmod(PTX_ARCH, 10)


def extension_spec(root: str) -> dict:
    """Keyword arguments of ``CUDAExtension`` for sfnn._C, sources relative to ``root``."""
    csrc = os.path.join(root, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "*.cpp")))
    return {
        "name": EXT_NAME,
        "sources": [os.path.relpath(s, root) for s in sources],
        "include_dirs": [csrc],
        # No -std flag: torch's BuildExtension adds the standard its headers need.
        "extra_compile_args": {"cxx": list(CXX_FLAGS),
                               "nvcc": [*NVCC_FLAGS, *nvcc_arch_flags()]},
    }


# ---------------------------------------------------------------------------------------------
# The flags torch's BuildExtension uses


def torch_build_commands(ext) -> list[list[str]]:
    """The commands torch's BuildExtension would run to build ``ext`` (a CppExtension or
    CUDAExtension), read from a dry run: the compiler is asked for nothing but the command lines
    (only the compiler-version checks of BuildExtension itself run)."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    commands: list[list[str]] = []

    class Recorder(BuildExtension):
        def build_extensions(self):
            def record(cmd, *args, **kwargs):
                commands.append([str(c) for c in cmd])

            self.compiler.spawn = self.compiler.call = record  # setuptools < 80 / >= 80
            super().build_extensions()

    with tempfile.TemporaryDirectory(prefix="sfnn_flags_") as tmp:
        cmd = Recorder.with_options(use_ninja=False)(Distribution({"ext_modules": [ext]}))
        cmd.build_temp = cmd.build_lib = tmp
        cmd.force = True
        cmd.ensure_finalized()
        cmd.run()
    if not commands:
        raise RuntimeError("could not read torch's compile lines from a BuildExtension dry run")
    return commands


@functools.cache
def _torch_cxx_template(include_dirs: tuple[str, ...]) -> tuple[str, ...]:
    """BuildExtension's g++ compile line for a placeholder source."""
    from torch.utils.cpp_extension import CppExtension

    src = os.path.join(tempfile.gettempdir(), "sfnn_placeholder.cpp")
    ext = CppExtension(name=EXT_NAME, sources=[src], include_dirs=list(include_dirs),
                       extra_compile_args={"cxx": list(CXX_FLAGS)})
    compiles = [c for c in torch_build_commands(ext) if "-c" in c and src in c]
    if len(compiles) != 1:
        raise RuntimeError(f"expected one compile line for {src} from BuildExtension: {compiles}")
    return tuple(compiles[0])


def torch_cxx_command(source: str, include_dirs: list[str], *, syntax_only: bool = True
                      ) -> list[str]:
    """The g++ command torch's BuildExtension runs for ``source`` (with ``include_dirs`` added),
    with ``-fsyntax-only`` in place of ``-c ... -o obj`` unless ``syntax_only`` is False."""
    template = list(_torch_cxx_template(tuple(str(d) for d in include_dirs)))
    i = template.index("-c")
    out = template.index("-o")
    cmd = template[:i] + template[i + 2:out] + template[out + 2:]  # drop "-c src" and "-o obj"
    return cmd + (["-fsyntax-only", str(source)] if syntax_only else ["-c", str(source)])


def torch_std_flag() -> str:
    """The ``-std=...`` flag torch's BuildExtension gives both g++ and nvcc."""
    flags = [f for f in _torch_cxx_template(()) if f.startswith("-std=")]
    if len(flags) != 1:
        raise RuntimeError(f"expected one -std flag in torch's compile command, got {flags}")
    return flags[0]


def nvcc_flags() -> list[str]:
    """nvcc's flags as in the real build, less the targets: torch's COMMON_NVCC_FLAGS and its
    C++ standard, then ours."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return [*COMMON_NVCC_FLAGS, torch_std_flag(), *NVCC_FLAGS]


# ---------------------------------------------------------------------------------------------
# The CUDA toolkit


def _nvcc_release(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out.stdout)
    return m[1] if out.returncode == 0 and m else None


def _is_toolkit(home: str) -> bool:
    return (os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)
            and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")))


def find_toolkits(nvcc_on_path: str | None = None) -> list[str]:
    """Directories holding a whole CUDA toolkit (bin/nvcc and include/cuda_runtime.h): from
    CUDA_HOME/CUDA_PATH, the nvcc on the PATH (followed through links and a wrapper script that
    ``exec``s another nvcc), then /usr/local/cuda and /usr/local/cuda-*; first found first."""
    nvcc = nvcc_on_path if nvcc_on_path is not None else shutil.which("nvcc")
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:
            if os.path.getsize(real) < 4096:
                with open(real, errors="replace") as f:
                    cands += [m[1] for m in re.finditer(r"(/\S+)/bin/nvcc\b", f.read())]
        except OSError:
            pass
    for guess in TOOLKIT_GUESSES:
        cands += sorted(glob.glob(guess), reverse=True)  # newest version first
    found: list[str] = []
    for cand in cands:
        if (cand and _is_toolkit(cand)
                and os.path.realpath(cand) not in map(os.path.realpath, found)):
            found.append(cand)
    return found


def toolkit_problem(cuda_home: str | None, torch_cuda: str) -> str | None:
    """None when ``cuda_home`` (the CUDA_HOME torch found) is a whole toolkit whose nvcc has
    torch's CUDA major version, else what is wrong and how to fix it."""
    fix = f"install the CUDA toolkit {torch_cuda} and set CUDA_HOME to it"
    others = [t for t in find_toolkits() if not cuda_home or
              os.path.realpath(t) != os.path.realpath(cuda_home)]
    if others:
        fix = (f"set CUDA_HOME to a whole CUDA toolkit (found: {', '.join(others)}), e.g. "
               f"`CUDA_HOME={others[0]} {BUILD_COMMAND}`")
    if not cuda_home:
        return f"torch found no CUDA toolkit (no nvcc on the PATH, CUDA_HOME unset); {fix}"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    where = (f"CUDA_HOME={cuda_home}" if os.environ.get("CUDA_HOME") else
             f"the CUDA toolkit torch found at {cuda_home} (from the nvcc on the PATH)")
    if not os.access(nvcc, os.X_OK):
        return f"{where} has no bin/nvcc; {fix}"
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (f"{where} has bin/nvcc but no include/cuda_runtime.h, so it is not a whole "
                f"CUDA toolkit; {fix}")
    release = _nvcc_release(nvcc)
    if release is None:
        return f"{nvcc} --version failed or printed no release; {fix}"
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"{nvcc} is CUDA {release} but torch is built with CUDA {torch_cuda} (the major "
                f"versions must match); {fix}")
    return None


# ---------------------------------------------------------------------------------------------
# Whether to build


class BuildRefused(RuntimeError):
    """SFNN_BUILD_CUDA=1 and the extension cannot be built."""


@dataclasses.dataclass(frozen=True)
class Decision:
    build: bool
    reason: str = ""  # why it is not built ("" when it is)
    warn: bool = False  # say so at install time


def decide(flag: str | None, torch_version: str | None, torch_cuda: str | None,
           cuda_home: str | None) -> Decision:
    """Build sfnn._C or not.

    flag: SFNN_BUILD_CUDA ("1" forces the build, "0" skips it, None or "" decides); torch_version:
    the torch importable at build time (None: none); torch_cuda: its ``torch.version.cuda``;
    cuda_home: the CUDA_HOME torch found (``torch.utils.cpp_extension.CUDA_HOME``).
    Raises BuildRefused when forced and impossible, ValueError for another flag value.
    """
    flag = (flag or "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"{ENV_FLAG} must be 1 (build the CUDA extension), 0 (skip it) or unset "
                         f"(build it when possible), got {flag!r}")
    if flag == "0":
        return Decision(False, f"{ENV_FLAG}=0 at install time")
    if torch_version is None:
        reason = ("torch was not importable at build time (pip builds in an isolated environment "
                  "unless given --no-build-isolation)")
    elif torch_cuda is None:
        reason = f"torch {torch_version} is built without CUDA"
    else:
        reason = toolkit_problem(cuda_home, torch_cuda)
        if reason is None:
            return Decision(True)
    if flag == "1":
        raise BuildRefused(f"{ENV_FLAG}=1 but the CUDA extension cannot be built: {reason}")
    # Worth a warning only where the user may have expected the extension.
    return Decision(False, reason, warn=torch_cuda is not None)


def guarded_build_ext(base: type, *, forced: bool, on_failure) -> type:
    """``base`` (a build_ext command) that, unless ``forced``, turns a failed build into a
    warning: the extensions are dropped, ``on_failure(reason)`` is called, the install goes on."""

    class GuardedBuildExt(base):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001 - any compiler/linker/toolkit failure
                if forced:
                    raise
                reason = (f"building it failed ({type(err).__name__}: {err}; the compiler's "
                          f"output is above, `pip install -v` shows it)")
                warn(reason)
                on_failure(reason)
                self.extensions = []

    return GuardedBuildExt


def warn(reason: str) -> None:
    """The install-time warning: what is not built, why, and how to build it."""
    how = "" if BUILD_COMMAND in reason else f" To build it: {BUILD_COMMAND}"
    warnings.warn(f"sfnn: installing without the CUDA extension {EXT_NAME}: {reason}. The "
                  f"package works without it (backend='cuda' is unavailable).{how}", stacklevel=2)


# ---------------------------------------------------------------------------------------------
# The record the installed package reads


def write_record(package_dir: str, *, built: bool, reason: str, prefix: str | None = None
                 ) -> None:
    """Record the install's outcome in ``package_dir`` (git-ignored, generated). ``prefix``: the
    ``sys.prefix`` of the environment the record is for (editable installs: the source tree is
    shared by every environment that installs it), None for any."""
    os.makedirs(package_dir, exist_ok=True)
    record = {"extension_built": built, "reason": reason}
    if prefix is not None:
        record["prefix"] = prefix
    with open(os.path.join(package_dir, RECORD_NAME), "w") as f:
        json.dump(record, f)


def recorded_reason(package_dir: str = HERE) -> str | None:
    """Why setup.py did not build the extension for this install, if it recorded that (and the
    record is for this environment)."""
    try:
        with open(os.path.join(package_dir, RECORD_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    prefix = record.get("prefix")
    if prefix is not None and os.path.realpath(prefix) != os.path.realpath(sys.prefix):
        return None  # another environment's editable install of this tree wrote it
    return None if record.get("extension_built") else (record.get("reason") or None)
