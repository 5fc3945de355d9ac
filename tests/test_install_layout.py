"""Installed, triton_kernels/ is sfnn.triton_kernels and never a top-level `triton_kernels`
(that name belongs to Triton's own MoE kernel package)."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, sys
import sfnn, sfnn.triton_kernels
where = sfnn.triton_kernels.__file__
assert where.endswith("__init__.py"), where
import sfnn.cpu_kernel  # the CPU kernel's source ships with the package (built on first use)
assert sfnn.cpu_kernel.SOURCE.exists(), sfnn.cpu_kernel.SOURCE
spec = importlib.util.find_spec("triton_kernels")
if spec is not None:  # Triton's own package may be installed; ours must not be what it finds
    ours = open("{repo}/triton_kernels/__init__.py").read()
    assert spec.origin is None or open(spec.origin).read() != ours, spec
print("OK", sfnn.__file__, where)
"""


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_install_layout(tmp_path, editable):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    build_tools = subprocess.run([py, "-m", "pip", "install", "-q", "setuptools>=64", "wheel"],
                                 capture_output=True, text=True)
    if build_tools.returncode:
        pytest.skip(f"could not install setuptools/wheel into a fresh venv: {build_tools.stderr}")
    build_env = {**os.environ, "SFNN_BUILD_CUDA": "0"}
    cmd = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-e", str(REPO)] if editable else [str(REPO)]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=build_env, capture_output=True)
    # torch and friends come from this interpreter's site-packages, whose .pth files (and so this
    # checkout's own editable install) are NOT processed when it is only a PYTHONPATH entry.
    run_env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    out = subprocess.run([py, "-c", CHECK.format(repo=REPO)], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sfnn_file = out.stdout.split()[1]
    if editable:
        assert sfnn_file.startswith(str(REPO)), out.stdout
    else:
        assert sfnn_file.startswith(str(env_dir)), out.stdout
    assert sys.executable != str(py)
