"""setup.py's rules for the CUDA extension (sfnn/_build.py), against fake environments.

1. Whether to build: no torch, CPU torch, CUDA torch with no nvcc, nvcc without headers, headers
   without nvcc, a toolkit of another CUDA version, a whole toolkit; forced on and off.
2. setup.py itself, run over a fake torch: what it warns, records and raises; a failing build
   in auto mode still installs the package.
3. Targets: the flags embed SASS for sm_80/sm_90 and PTX for compute_90 (read back with
   cuobjdump), and backend="auto" skips the extension on a GPU it cannot run on.
4. Flags: what the compile checks give nvcc is what torch's BuildExtension gives it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sfnn.cuda_ext
from sfnn import _build, ops

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


def _fake_toolkit(root: Path, *, nvcc: bool = True, headers: bool = True,
                  release: str = "13.0") -> Path:
    if nvcc:
        (root / "bin").mkdir(parents=True)
        script = root / "bin" / "nvcc"
        script.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                          f"echo 'Cuda compilation tools, release {release}, V{release}.88'\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    return root


@pytest.fixture
def no_toolkits(monkeypatch):
    """Nothing of this machine's CUDA is found: no CUDA_HOME, no nvcc on the PATH, no guesses."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    monkeypatch.setattr(_build, "TOOLKIT_GUESSES", ())


# ---------------------------------------------------------------------------------------------
# 1. the decision


@pytest.mark.parametrize("flag", [None, "", "0", "1"])
def test_no_torch_at_build_time(flag):
    if flag == "1":
        with pytest.raises(_build.BuildRefused, match="SFNN_BUILD_CUDA=1.*not importable"):
            _build.decide(flag, None, None, None)
        return
    d = _build.decide(flag, None, None, None)
    assert not d.build and not d.warn
    assert ("SFNN_BUILD_CUDA=0" if flag == "0" else "--no-build-isolation") in d.reason


@pytest.mark.parametrize("flag", [None, "0", "1"])
def test_cpu_torch(flag):
    if flag == "1":
        with pytest.raises(_build.BuildRefused, match="torch 2.13.0\\+cpu is built without CUDA"):
            _build.decide(flag, "2.13.0+cpu", None, None)
        return
    d = _build.decide(flag, "2.13.0+cpu", None, None)
    assert not d.build and not d.warn  # nothing a CPU-torch user expected


def test_cuda_torch_without_nvcc(no_toolkits):
    d = _build.decide(None, "2.14.1+cu130", "13.0", None)
    assert not d.build and d.warn
    assert "found no CUDA toolkit" in d.reason and "install the CUDA toolkit 13.0" in d.reason
    with pytest.raises(_build.BuildRefused, match="found no CUDA toolkit"):
        _build.decide("1", "2.14.1+cu130", "13.0", None)
    assert _build.decide("0", "2.14.1+cu130", "13.0", None) == _build.Decision(
        False, "SFNN_BUILD_CUDA=0 at install time")


def test_cuda_torch_nvcc_without_headers(tmp_path, no_toolkits, monkeypatch):
    """The issue-17 machine: a wrapper nvcc in <prefix>/bin, the toolkit elsewhere; torch takes
    <prefix> for CUDA_HOME. Auto skips with a warning naming the whole toolkit; forced fails."""
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    wrapper = prefix / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(_build.shutil, "which", lambda name: str(wrapper))
    d = _build.decide(None, "2.14.1+cu130", "13.0", str(prefix))
    assert not d.build and d.warn
    assert "no include/cuda_runtime.h" in d.reason, d.reason
    assert f"CUDA_HOME={toolkit} SFNN_BUILD_CUDA=1 pip install" in d.reason, d.reason
    with pytest.raises(_build.BuildRefused, match="no include/cuda_runtime.h"):
        _build.decide("1", "2.14.1+cu130", "13.0", str(prefix))
    # ... and once CUDA_HOME names the toolkit, it builds
    assert _build.decide(None, "2.14.1+cu130", "13.0", str(toolkit)) == _build.Decision(True)


def test_cuda_torch_headers_without_nvcc(tmp_path, no_toolkits):
    home = _fake_toolkit(tmp_path / "cuda", nvcc=False)
    d = _build.decide(None, "2.14.1+cu130", "13.0", str(home))
    assert not d.build and d.warn and "has no bin/nvcc" in d.reason


def test_cuda_torch_other_cuda_major(tmp_path, no_toolkits):
    home = _fake_toolkit(tmp_path / "cuda-12.4", release="12.4")
    d = _build.decide(None, "2.14.1+cu130", "13.0", str(home))
    assert not d.build and d.warn and "is CUDA 12.4 but torch is built with CUDA 13.0" in d.reason
    with pytest.raises(_build.BuildRefused, match="CUDA 12.4"):
        _build.decide("1", "2.14.1+cu130", "13.0", str(home))


@pytest.mark.parametrize("flag", [None, "", "1"])
def test_whole_toolkit_builds(tmp_path, no_toolkits, flag):
    home = _fake_toolkit(tmp_path / "cuda", release="13.2")  # minor versions may differ
    assert _build.decide(flag, "2.14.1+cu130", "13.0", str(home)) == _build.Decision(True)
    assert not _build.decide("0", "2.14.1+cu130", "13.0", str(home)).build


def test_unknown_flag_value_is_an_error():
    with pytest.raises(ValueError, match="SFNN_BUILD_CUDA must be 1 .*, got 'yes'"):
        _build.decide("yes", "2.14.1+cu130", "13.0", None)


def test_find_toolkits_follows_links_and_wrappers(tmp_path, no_toolkits, monkeypatch):
    real = _fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    (tmp_path / "bin").mkdir()
    link = tmp_path / "bin" / "nvcc"
    link.symlink_to(real / "bin" / "nvcc")
    assert _build.find_toolkits(str(link)) == [str(real)]
    wrapper = tmp_path / "wrapper-nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    assert _build.find_toolkits(str(wrapper)) == [str(real)]
    other = _fake_toolkit(tmp_path / "env-cuda")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert _build.find_toolkits(str(wrapper)) == [str(other), str(real)]
    assert _build.find_toolkits(None) == [str(other)]


# ---------------------------------------------------------------------------------------------
# 2. setup.py over a fake torch

FAKE_TORCH = '''
import os
__version__ = os.environ["FAKE_TORCH_VERSION"]
class version:
    cuda = os.environ.get("FAKE_TORCH_CUDA") or None
'''
FAKE_CPP_EXTENSION = '''
import os
from setuptools import Extension
from setuptools.command.build_ext import build_ext
CUDA_HOME = os.environ.get("FAKE_CUDA_HOME") or None
class BuildExtension(build_ext):  # plain setuptools: it cannot compile .cu, so the build fails
    @classmethod
    def with_options(cls, **options):
        return cls
def CUDAExtension(name, sources, include_dirs, extra_compile_args):
    return Extension(name, sources, include_dirs=include_dirs, language="c++",
                     extra_compile_args=extra_compile_args["cxx"])
'''


def _run_setup(tmp_path: Path, flag: str | None, torch_cuda: str | None,
               cuda_home: Path | None) -> tuple[subprocess.CompletedProcess, dict | None]:
    fake = tmp_path / "fake"
    (fake / "torch" / "utils").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (fake / "torch" / "utils" / "__init__.py").write_text("")
    (fake / "torch" / "utils" / "cpp_extension.py").write_text(FAKE_CPP_EXTENSION)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SFNN_BUILD_CUDA", "CUDA_HOME", "CUDA_PATH")}
    env.update(PYTHONPATH=str(fake), FAKE_TORCH_VERSION="2.14.1+fake", FAKE_TORCH_CUDA=torch_cuda
               or "", FAKE_CUDA_HOME=str(cuda_home or ""), PATH="/usr/bin:/bin")
    if flag is not None:
        env["SFNN_BUILD_CUDA"] = flag
    build = tmp_path / "build"
    out = subprocess.run([sys.executable, str(REPO / "setup.py"), "-q", "build",
                          "--build-base", str(build), "--build-lib", str(build / "lib")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    record = build / "lib" / "sfnn" / _build.RECORD_NAME
    return out, (json.loads(record.read_text()) if record.exists() else None)


@pytest.mark.parametrize("case", ["cpu-torch", "cuda-torch-no-headers", "forced-no-headers",
                                  "off", "build-fails", "forced-build-fails"])
def test_setup_py_outcome(tmp_path, case):
    torch_cuda = None if case == "cpu-torch" else "13.0"
    headerless = _fake_toolkit(tmp_path / "usr-local", headers=False)
    whole = _fake_toolkit(tmp_path / "cuda-13.0")
    home = whole if case.endswith("build-fails") else headerless
    flag = {"forced-no-headers": "1", "forced-build-fails": "1", "off": "0"}.get(case)
    out, record = _run_setup(tmp_path, flag, torch_cuda, home)
    log = out.stdout + out.stderr
    if case.startswith("forced"):
        assert out.returncode != 0, log
        why = "no include/cuda_runtime.h" if case == "forced-no-headers" else "\\.cu"
        assert re.search(why, log), log
        return
    assert out.returncode == 0, log
    assert record is not None and record["extension_built"] is False, (record, log)
    warned = "sfnn: installing without the CUDA extension sfnn._C" in log
    assert warned == (case in ("cuda-torch-no-headers", "build-fails")), log
    expect = {"cpu-torch": "torch 2.14.1+fake is built without CUDA",
              "cuda-torch-no-headers": "no include/cuda_runtime.h",
              "off": "SFNN_BUILD_CUDA=0",
              "build-fails": "building it failed"}[case]
    assert expect in record["reason"], record
    assert (tmp_path / "build" / "lib" / "sfnn" / "ops.py").exists()  # the package still builds
    assert not list((tmp_path / "build" / "lib").rglob("_C*.so"))


def test_recorded_reason_reaches_unavailable_reason(tmp_path):
    _build.write_record(str(tmp_path), built=False, reason="because of X")
    assert _build.recorded_reason(str(tmp_path)) == "because of X"
    _build.write_record(str(tmp_path), built=True, reason="")
    assert _build.recorded_reason(str(tmp_path)) is None
    assert _build.recorded_reason(str(tmp_path / "nowhere")) is None
    # an editable install's record speaks for the environment that wrote it only
    _build.write_record(str(tmp_path), built=False, reason="because of Y", prefix=sys.prefix)
    assert _build.recorded_reason(str(tmp_path)) == "because of Y"
    _build.write_record(str(tmp_path), built=False, reason="another venv's reason",
                        prefix=str(tmp_path / "other-venv"))
    assert _build.recorded_reason(str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# 3. targets


def test_arch_flags_embed_sass_for_each_target_and_ptx_for_the_newest():
    assert _build.nvcc_arch_flags() == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    spec = _build.extension_spec(str(REPO))
    assert spec["extra_compile_args"]["nvcc"][-6:] == _build.nvcc_arch_flags()
    assert sorted(spec["sources"]) == sorted(
        str(p.relative_to(REPO)) for p in [*REPO.glob("csrc/*.cu"), *REPO.glob("csrc/*.cpp")])
    assert not any(f.startswith("-std") for fl in spec["extra_compile_args"].values() for f in fl)


def _cuobjdump() -> str | None:
    """cuobjdump from the PATH, the toolkit, or the triton wheel (which carries one)."""
    cands = [shutil.which("cuobjdump")]
    if NVCC is not None:
        cands += [os.path.join(t, "bin", "cuobjdump") for t in _build.find_toolkits(NVCC)]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and cuobjdump")
def test_compiled_object_holds_the_targets_runs_on_assumes(tmp_path):
    """Compile a kernel with the extension's flags, read back what it embeds, and check that
    runs_on() says yes exactly for the capabilities that machine code or PTX can serve."""
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run([NVCC, "-c", *_build.nvcc_flags(), *_build.nvcc_arch_flags(), str(src),
                    "-o", str(obj)], check=True, capture_output=True, timeout=300)
    listing = subprocess.run([_cuobjdump(), "--list-elf", "--list-ptx", str(obj)], check=True,
                             capture_output=True, text=True).stdout
    sass = sorted({int(m) for m in re.findall(r"\.sm_(\d+)\.cubin", listing)})
    ptx = sorted({int(m) for m in re.findall(r"\.sm_(\d+)\.ptx", listing)})
    assert sass == list(_build.SASS_ARCHS) and ptx == [_build.PTX_ARCH], listing
    for cap in [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3),
                (12, 0), (12, 1)]:
        cc = cap[0] * 10 + cap[1]
        served = any(a // 10 == cap[0] and a <= cc for a in sass) or any(p <= cc for p in ptx)
        assert _build.runs_on(cap) == served, cap
    assert not _build.runs_on((7, 5)) and _build.runs_on((8, 6)) and _build.runs_on((12, 0))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, with the extension 'built'."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(sfnn.cuda_ext, "available", lambda: True)
    monkeypatch.setattr(ops, "triton_import_error", lambda: "no triton in this test")
    return cap


@pytest.mark.parametrize("cap, expected", [((7, 5), "torch"), ((8, 0), "cuda"), ((8, 9), "cuda"),
                                           ((9, 0), "cuda"), ((10, 0), "cuda"), ((12, 0), "cuda")])
def test_auto_skips_the_extension_where_its_kernels_cannot_run(fake_gpu, cap, expected):
    fake_gpu["value"] = cap
    dev = torch.device("cuda", 0)
    for d in (dev, "cuda", 0):
        assert sfnn.cuda_ext.supports_device(d) == (expected == "cuda"), d
    assert ops.resolve_backend("auto", dev, n_tokens=1, needs_grad=False) == expected
    if expected == "cuda":
        assert ops.resolve_backend("cuda", dev, n_tokens=1, needs_grad=False) == "cuda"
    else:  # asked for explicitly, it says why it cannot run
        with pytest.raises(RuntimeError, match=r"machine code for sm_80, sm_90 and PTX for "
                                               r"compute_90, none of which runs on cuda:0 "
                                               r"\(compute capability 7\.5\)"):
            ops.resolve_backend("cuda", dev, n_tokens=1, needs_grad=False)


@pytest.mark.parametrize("cap, expected", [((8, 6), 1.0), ((7, 5), 2.0)])
def test_capability_lookup_traces_under_torch_compile(monkeypatch, cap, expected):
    """resolve_backend runs while torch.compile traces the layer: the capability lookup, through
    the real torch.cuda.get_device_capability (over faked device properties), traces with no
    graph break and decides as in eager mode."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=cap[0], minor=cap[1]))

    def f(x):
        return x + (1.0 if _build.runs_on(sfnn.cuda_ext._capability(0)) else 2.0)

    torch._dynamo.reset()
    try:
        out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    finally:
        torch._dynamo.reset()
    assert out.tolist() == [expected, expected]


def test_supports_device_is_false_off_the_gpu():
    assert not sfnn.cuda_ext.supports_device("cpu")
    assert not sfnn.cuda_ext.supports_device(torch.device("meta"))
    assert "CUDA GPUs only" in sfnn.cuda_ext.device_unsupported_reason("cpu")


# ---------------------------------------------------------------------------------------------
# 4. flags


def test_torch_cxx_command_is_buildextensions_line():
    cmd = _build.torch_cxx_command("x.cpp", ["/inc"])
    assert cmd[-2:] == ["-fsyntax-only", "x.cpp"] and "-c" not in cmd and "-o" not in cmd
    assert "-I/inc" in cmd and _build.torch_std_flag() in cmd
    assert _build.torch_cxx_command("x.cpp", ["/inc"], syntax_only=False)[-2:] == ["-c", "x.cpp"]


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_nvcc_flags_are_torchs(monkeypatch):
    """With a CUDA torch, a dry run of the real extension through BuildExtension: its nvcc line
    holds every flag the compile checks use, and the same C++ standard."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("torch found no CUDA_HOME")
    spec = _build.extension_spec(str(REPO))
    spec["sources"] = [str(REPO / s) for s in spec["sources"]]
    monkeypatch.chdir(REPO)
    cmds = _build.torch_build_commands(cpp_extension.CUDAExtension(**spec))
    nvcc = [c for c in cmds if any(s.endswith(".cu") for s in c)]
    assert len(nvcc) == 1, cmds
    stds = [f for f in nvcc[0] if f.startswith("-std=")]
    assert stds == [_build.torch_std_flag()], nvcc[0]
    missing = [f for f in _build.nvcc_flags() + _build.nvcc_arch_flags() if f not in nvcc[0]]
    assert not missing, (missing, nvcc[0])
    cxx = [c for c in cmds if any(s.endswith(".cpp") for s in c) and "-c" in c]
    assert [f for f in cxx[0] if f.startswith("-std=")] == stds, cxx


def test_setup_py_loads_the_helper_without_the_package():
    """setup.py runs before sfnn is importable; sfnn/_build.py must not import sfnn or torch at
    module level."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("b", {str(REPO / 'sfnn' / '_build.py')!r})
        m = importlib.util.module_from_spec(spec); sys.modules["b"] = m
        spec.loader.exec_module(m)
        assert "torch" not in sys.modules and "sfnn" not in sys.modules, sorted(sys.modules)
        print(m.nvcc_arch_flags())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
