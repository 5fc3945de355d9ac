"""The CUDA C++ extension (csrc/, sfnn/cuda_ext.py), proven without a GPU as far as possible.

1. Every csrc/*.cu compiles alone with nvcc for sm_80 and sm_90 and ptxas reports no spills.
2. Every csrc/*.cpp passes ``g++ -fsyntax-only`` against the CPU torch headers + CUDA's include.
3. Emulated: csrc/decode.cu, compiled by g++ against the test-only CPU emulator in csrc/emu/
   (each CUDA thread a fiber), runs its real kernels and launchers on CPU tensors, which
   are checked against sfnn.reference (selection exactly, outputs within tolerance).
4. On a GPU with the extension built, the registered ops against sfnn.reference.
5. Here, sfnn.cuda_ext says it is unavailable and how to build it.
The compilers run in parallel, started once per module: the file takes about 2.5 minutes on
two cores, most of it nvcc; `-m "not slow"` skips the binding build.
"""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

import sfnn.cuda_ext
from sfnn import _build
from sfnn.reference import block_ffn_ref, block_scores_ref, select_blocks_ref
from sfnn.testing import TOLERANCES, assert_close

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
CPP_FILES = sorted(CSRC.glob("*.cpp"))
ARCHS = (80, 90)
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT_TAG = {"relu": 0, "gelu": 1, "silu": 2}


def _cuda_home() -> Path | None:
    """A whole CUDA toolkit (nvcc and headers), found as setup.py's probe finds one."""
    found = _build.find_toolkits(NVCC) if NVCC is not None else []
    return Path(found[0]) if found else None


class _Jobs:
    """Compiler runs started together, awaited one by one."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, key: str, cmd: list[str]) -> None:
        log = self.tmp / (re.sub(r"\W", "_", key) + ".log")
        with open(log, "w") as f:
            self.procs[key] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                cwd=REPO), log)

    def result(self, key: str) -> tuple[int, str]:
        proc, log = self.procs[key]
        rc = proc.wait(timeout=900)
        return rc, log.read_text()


def _emu_source() -> str:
    """csrc/decode.cu rewritten for the CPU emulator: launches and dynamic shared memory."""
    src = (CSRC / "decode.cu").read_text()
    src = re.sub(r"extern __shared__ ([\w ]+?) (\w+)\[\];",
                 r"\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem());", src)
    src, n = re.subn(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);",
                     lambda m: f"emu::launch([=]() {{ {m[1]}({m[3]}); }}, {m[2]});", src,
                     flags=re.S)
    assert n >= 4, "expected the kernel launches of decode.cu"
    return src + '\nextern "C" void sfnn_emu_set_sm_count(int n) { emu::sm_count_value = n; }\n'


@pytest.fixture(scope="module")
def jobs(request):
    tmp = Path(tempfile.mkdtemp(prefix="sfnn_cuda_ext_"))
    j = _Jobs(tmp)
    if NVCC is not None:
        for cu in CU_FILES:
            for arch in ARCHS:
                j.start(f"nvcc:{cu.name}:{arch}",
                        # the real build's flags (torch's C++ standard and nvcc defines), one arch
                        [NVCC, "-c", f"-arch=sm_{arch}", *_build.nvcc_flags(), f"-I{CSRC}",
                         "-Xptxas", "-v", str(cu), "-o", str(tmp / f"{cu.stem}_{arch}.o")])
    cuda_home = _cuda_home()
    if GXX is not None and cuda_home is not None:
        for cpp in CPP_FILES:  # the g++ line torch's BuildExtension runs, with -fsyntax-only
            j.start(f"gxx:{cpp.name}", _build.torch_cxx_command(
                str(cpp), [str(CSRC), str(cuda_home / "include")]))
    if GXX is not None:
        src = _emu_source()
        digest = hashlib.sha256((src + (CSRC / "emu" / "emu.h").read_text()
                                 + (CSRC / "decode.h").read_text()).encode()).hexdigest()[:16]
        j.emu_lib = tmp / f"decode_emu_{digest}.so"
        (tmp / "decode_emu.cpp").write_text(src)
        emu_flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                     f"-I{CSRC / 'emu'}", f"-I{CSRC}"]
        j.start("emu", [GXX, *emu_flags, "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
                        str(tmp / "decode_emu.cpp"), "-o", str(j.emu_lib)])
        if any("binding_registers" in item.nodeid for item in request.session.items):
            from torch.utils.cpp_extension import include_paths

            lib_dir = Path(torch.__file__).parent / "lib"
            j.start("emu_binding", [
                GXX, *emu_flags, *[f"-I{p}" for p in include_paths()],
                f"-I{sysconfig.get_paths()['include']}", str(CSRC / "binding.cpp"),
                str(tmp / "decode_emu.cpp"), "-o", str(tmp / "_C.so"), f"-L{lib_dir}", "-ltorch",
                "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"])
    yield j
    for proc, _ in j.procs.values():
        if proc.poll() is None:
            proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 1. nvcc + ptxas


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, stack, spill stores/loads, from ``-Xptxas -v`` output."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = kernels.setdefault(m[1], {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m[1])
    return kernels


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/*.cu")
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cu_compiles_without_spills(jobs, cu, arch):
    rc, log = jobs.result(f"nvcc:{cu.name}:{arch}")
    assert rc == 0, f"nvcc failed for {cu.name} sm_{arch}:\n{log[-6000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"no kernels in the ptxas report of {cu.name}:\n{log[-3000:]}"
    for name, info in kernels.items():
        assert "spill_stores" in info and "registers" in info, (name, info)
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, (
            f"{cu.name} sm_{arch}: {name} spills: {info}")
    short = {n: re.sub(r"^_ZN.*?(decode_\w+?_kernel)(I.*?E)?E.*$", r"\1\2", n) for n in kernels}
    print(f"\n{cu.name} sm_{arch}: " + ", ".join(
        f"{short[n]}:{i['registers']}r" for n, i in kernels.items()))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile csrc/*.cu")
def test_nothing_but_cu_and_cpp_in_csrc_is_compiled():
    # setup.py builds glob("csrc/*.cu") + glob("csrc/*.cpp"); the emulator must stay out of it.
    assert not list((CSRC / "emu").glob("*.cu")) and not list((CSRC / "emu").glob("*.cpp"))
    assert [p.name for p in CU_FILES] == ["decode.cu"]


# ---------------------------------------------------------------------------------------------
# 2. the torch binding against CPU torch headers


@pytest.mark.skipif(GXX is None or _cuda_home() is None,
                    reason="g++ or CUDA's include/ (from nvcc) is missing: cannot syntax-check "
                           "csrc/*.cpp")
@pytest.mark.parametrize("cpp", CPP_FILES, ids=[p.name for p in CPP_FILES])
def test_cpp_syntax(jobs, cpp):
    rc, log = jobs.result(f"gxx:{cpp.name}")
    assert rc == 0, f"g++ -fsyntax-only failed for {cpp.name}:\n{log[-6000:]}"


# ---------------------------------------------------------------------------------------------
# 3. the kernels themselves, in the CPU emulator


class EmuDecode:
    """ctypes front end to the emulated launchers, with the binding's conventions."""

    def __init__(self, path: Path, sm_count: int = 8):
        lib = ctypes.CDLL(str(path))
        vp, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
        lib.sfnn_decode_select_workspace_bytes.restype = sz
        lib.sfnn_decode_select_workspace_bytes.argtypes = [i64, i64, i64, i64, i32]
        lib.sfnn_decode_select.restype = i32
        lib.sfnn_decode_select.argtypes = [vp, i32, i64, vp, i64, vp, i64, i64, i64, i64, vp, i64,
                                           vp, sz, vp]
        lib.sfnn_decode_ffn_workspace_bytes.restype = sz
        lib.sfnn_decode_ffn_workspace_bytes.argtypes = [i64, i64, i64, i64, i32]
        lib.sfnn_decode_ffn.restype = i32
        lib.sfnn_decode_ffn.argtypes = [vp, i64, vp, i64, vp, i64, vp, i64, vp, vp, vp, i64, vp,
                                        i64, i32, i32, i64, i64, i64, i64, i64, vp, sz, vp]
        lib.sfnn_emu_set_sm_count(sm_count)
        self.lib = lib

    @staticmethod
    def _ptr(t):
        return None if t is None else t.data_ptr()

    @staticmethod
    def _stride(t):
        return t.stride(0) if t.shape[0] > 1 else 0

    @staticmethod
    def _workspace(n):
        buf = torch.full((n + 256,), 0xCD, dtype=torch.uint8)  # poisoned
        off = (-buf.data_ptr()) % 256
        return buf, buf.data_ptr() + off

    def select(self, x, kbar, bbar, top_k):
        T, d = x.shape
        nb = kbar.shape[0]
        out = torch.full((T, top_k), -7, dtype=torch.int32)
        n = self.lib.sfnn_decode_select_workspace_bytes(T, nb, d, top_k, 0)
        buf, ws = self._workspace(n)
        err = self.lib.sfnn_decode_select(
            self._ptr(x), DTYPE_TAG[x.dtype], self._stride(x), self._ptr(kbar),
            self._stride(kbar), self._ptr(bbar), T, nb, d, top_k, self._ptr(out), out.stride(0),
            ws, n, None)
        assert err == 0, f"sfnn_decode_select returned {err}"
        return out

    def ffn(self, x, keys, values, indices, key_bias, out_bias, gates, block_size, activation):
        T, d = x.shape
        top_k = indices.shape[1]
        y = torch.full((T, d), float("nan"), dtype=x.dtype)  # poisoned
        n = self.lib.sfnn_decode_ffn_workspace_bytes(T, top_k, block_size, d, 0)
        buf, ws = self._workspace(n)
        err = self.lib.sfnn_decode_ffn(
            self._ptr(x), self._stride(x), self._ptr(keys), self._stride(keys),
            self._ptr(values), self._stride(values), self._ptr(indices), self._stride(indices),
            self._ptr(key_bias), self._ptr(out_bias), self._ptr(gates),
            0 if gates is None else self._stride(gates), self._ptr(y), y.stride(0),
            DTYPE_TAG[x.dtype], ACT_TAG[activation], T, top_k, keys.shape[0] // block_size,
            block_size, d, ws, n, None)
        assert err == 0, f"sfnn_decode_ffn returned {err}"
        return y


@pytest.fixture(scope="module")
def emu(jobs):
    if GXX is None:
        pytest.skip("g++ is not on PATH: cannot build the CPU emulation of csrc/decode.cu")
    rc, log = jobs.result("emu")
    assert rc == 0, f"building the emulated decode.cu failed:\n{log[-6000:]}"
    return EmuDecode(jobs.emu_lib)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _strided(t, layout, gen):
    """t's values in a tensor of the given layout: "contig", "padded" (row stride rounded up to
    16 elements), "offset" (base pointer one element past an aligned address)."""
    if layout == "contig":
        return t.contiguous()
    rows, cols = t.shape
    if layout == "padded":
        big = torch.randn(rows, (cols + 15) // 16 * 16, generator=gen).to(t.dtype)
        big[:, :cols] = t
        return big[:, :cols]
    assert layout == "offset"
    flat = torch.randn(rows * cols + 1, generator=gen).to(t.dtype)
    view = flat[1:].view(rows, cols)
    view.copy_(t)
    return view


def _check_selection(out, x, kbar, bbar, top_k, exact):
    ref = select_blocks_ref(x, kbar, bbar, top_k)
    assert out.dtype == torch.int32 and out.shape == ref.shape
    nb = kbar.shape[0]
    assert bool(((out >= 0) & (out < nb)).all()), out
    for row in out.tolist():
        assert len(set(row)) == top_k, f"repeated index in {row}"
    if exact:
        assert torch.equal(out, ref), f"\n{out}\n!=\n{ref}"
        return
    # fp32 sums in another order: the chosen scores must be the top_k scores, best first.
    s = block_scores_ref(x.double(), kbar.double(), None if bbar is None else bbar.double())
    got = s.gather(1, out.long())
    want = s.gather(1, ref.long())
    tol = 1e-4 * (1 + s.abs().max())
    assert bool(((got - want).abs() <= tol).all()), (got, want)
    assert bool((got[:, 1:] <= got[:, :-1] + tol).all()), got


SELECT_CASES = [
    # T, d_model, n_blocks, top_k, dtype, layout, integer data (exact scores, many ties)
    pytest.param(1, 64, 12, 3, torch.float32, "contig", False, id="T1-d64-nb12-k3-f32"),
    pytest.param(1, 64, 12, 3, torch.bfloat16, "contig", True, id="T1-d64-nb12-k3-bf16-ties"),
    pytest.param(3, 37, 5, 5, torch.bfloat16, "contig", True, id="T3-d37-nb5-k5-bf16-odd-ties"),
    pytest.param(15, 75, 33, 1, torch.float16, "padded", False, id="T15-d75-nb33-k1-f16-padded"),
    pytest.param(20, 40, 9, 4, torch.float32, "offset", True, id="T20-d40-nb9-k4-f32-misal-ties"),
    pytest.param(2, 2304, 5, 2, torch.bfloat16, "contig", False, id="T2-d2304-nb5-k2-bf16-sliced"),
    pytest.param(2, 24, 520, 64, torch.float16, "contig", True, id="T2-d24-nb520-k64-f16-ties"),
]


@pytest.mark.parametrize("T, d_model, n_blocks, top_k, dtype, layout, integer", SELECT_CASES)
def test_emulated_decode_select(emu, T, d_model, n_blocks, top_k, dtype, layout, integer):
    gen = _gen(T * 1000 + d_model + n_blocks)
    if integer:  # exact scores in any summation order, with many ties: must match exactly
        x = torch.randint(-2, 3, (T, d_model), generator=gen).to(dtype)
        kbar = torch.randint(-2, 3, (n_blocks, d_model), generator=gen).float()
        bbar = torch.randint(-3, 4, (n_blocks,), generator=gen).float()
        kbar[n_blocks // 2] = kbar[0]  # guaranteed exact ties
        bbar[n_blocks // 2] = bbar[0]
    else:
        x = torch.randn(T, d_model, generator=gen).to(dtype)
        kbar = torch.randn(n_blocks, d_model, generator=gen) / d_model ** 0.5
        bbar = torch.randn(n_blocks, generator=gen) * 0.1
    x = _strided(x, layout, gen)
    kbar = _strided(kbar, layout, gen)
    bbar_arg = bbar if T % 2 == 0 else None
    out = emu.select(x, kbar, bbar_arg, top_k)
    _check_selection(out, x.float(), kbar, bbar_arg, top_k, exact=integer)
    assert torch.equal(out, emu.select(x, kbar, bbar_arg, top_k)), "not deterministic"


def test_emulated_decode_select_nan_and_inf_tokens(emu):
    gen = _gen(7)
    x = torch.randn(4, 32, generator=gen)
    x[1, 3] = float("nan")
    x[2] = float("inf")
    kbar = torch.randn(10, 32, generator=gen)
    out = emu.select(x, kbar, None, 6)
    for row in out.tolist():
        assert len(set(row)) == 6 and all(0 <= i < 10 for i in row), row
    assert out[1].tolist() == list(range(6))  # all NaN: ties -> smaller index, as the reference
    ref = select_blocks_ref(x, kbar, None, 6)
    assert torch.equal(out[[0, 1, 3]], ref[[0, 1, 3]])


def _indices(T, n_blocks, top_k, gen, duplicates):
    if duplicates:  # repeated blocks within a row count twice
        return torch.randint(0, n_blocks, (T, top_k), generator=gen, dtype=torch.int32)
    return torch.stack([torch.randperm(n_blocks, generator=gen)[:top_k]
                        for _ in range(T)]).to(torch.int32)


def _ffn_ref(x, keys, values, indices, key_bias, out_bias, gates, block_size, activation):
    up = [None if t is None else t.detach().double() for t in (x, keys, values, key_bias,
                                                               out_bias)]
    return block_ffn_ref(up[0], up[1], up[2], indices, block_size=block_size, key_bias=up[3],
                         out_bias=up[4], gates=None if gates is None else gates.double(),
                         activation=activation)


FFN_CASES = [
    # T, d_model, n_blocks, block_size, top_k, layout, duplicates, dtype
    *[pytest.param(1, 64, 6, 16, 2, "contig", False, dt, id=f"T1-d64-nb6-g16-k2-chunked-{n}")
      for dt, n in zip(DTYPES, ("f32", "f16", "bf16"), strict=True)],
    *[pytest.param(15, 75, 7, 8, 3, "padded", False, dt, id=f"T15-d75-nb7-g8-k3-tail-{n}")
      for dt, n in zip(DTYPES, ("f32", "f16", "bf16"), strict=True)],
    pytest.param(3, 37, 5, 4, 3, "contig", True, torch.float16, id="T3-d37-nb5-g4-k3-odd-dups-f16"),
    pytest.param(11, 40, 3, 8, 2, "offset", True, torch.bfloat16,
                 id="T11-d40-nb3-g8-k2-misaligned-groups-bf16"),
]


@pytest.mark.parametrize("T, d_model, n_blocks, block_size, top_k, layout, duplicates, dtype",
                         FFN_CASES)
def test_emulated_decode_ffn(emu, T, d_model, n_blocks, block_size, top_k, layout, duplicates,
                             dtype):
    gen = _gen(T * 100 + d_model + block_size)
    d_ff = n_blocks * block_size
    x = torch.randn(T, d_model, generator=gen).to(dtype)
    keys = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    values = (torch.randn(d_ff, d_model, generator=gen) * d_ff ** -0.5).to(dtype)
    key_bias = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype)
    out_bias = (torch.randn(d_model, generator=gen) * 0.1).to(dtype)
    gates = torch.rand(T, top_k, generator=gen)
    gates[0, 0] = 0.0
    indices = _indices(T, n_blocks, top_k, gen, duplicates)
    x, keys, values = (_strided(t, layout, gen) for t in (x, keys, values))
    atol, rtol = TOLERANCES[dtype]
    for i, activation in enumerate(("relu", "gelu", "silu")):
        bias = i != 1
        gated = i != 2
        args = (x, keys, values, indices, key_bias if bias else None, out_bias if bias else None,
                gates if gated else None, block_size, activation)
        y = emu.ffn(*args)
        assert y.dtype == dtype
        assert_close(y.double(), _ffn_ref(*args), atol=atol, rtol=rtol,
                     name=f"y[{activation}, bias={bias}, gates={gated}]")
        if i == 0 and dtype == torch.bfloat16:
            assert torch.equal(y, emu.ffn(*args)), "not deterministic"


def test_emulated_decode_ffn_nan_token_stays_in_its_row(emu):
    gen = _gen(3)
    T, d, nb, g, k = 4, 32, 4, 8, 2
    x = torch.randn(T, d, generator=gen)
    x[2, 5] = float("nan")
    keys = torch.randn(nb * g, d, generator=gen)
    values = torch.randn(nb * g, d, generator=gen)
    indices = _indices(T, nb, k, gen, False)
    y = emu.ffn(x, keys, values, indices, None, None, None, g, "relu")
    ref = _ffn_ref(x, keys, values, indices, None, None, None, g, "relu")
    assert_close(y.double(), ref, atol=TOLERANCES[torch.float32][0],
                 rtol=TOLERANCES[torch.float32][1], name="y")
    assert bool(torch.isfinite(y[[0, 1, 3]]).all())


BINDING_CHECK = """
import sys, torch
if sys.argv[1] == "python-first":
    import sfnn.ops
    torch.ops.load_library(sys.argv[2])
else:
    torch.ops.load_library(sys.argv[2])
    import sfnn.ops
import sfnn.cuda_ext
assert str(torch.ops.sfnn.decode_select.default._schema) == (
    "sfnn::decode_select(Tensor x, Tensor kbar, Tensor? bbar, int top_k) -> Tensor")
assert "Tensor? gates, int block_size, str activation) -> Tensor" in str(
    torch.ops.sfnn.decode_ffn.default._schema)
assert hasattr(torch.ops.sfnn, "block_ffn")  # the op layer's Python ops share the namespace
sfnn.cuda_ext._register_fakes()
x = torch.empty(3, 64, device="meta", dtype=torch.bfloat16)
idx = torch.ops.sfnn.decode_select(x, torch.empty(8, 64, device="meta"), None, 4)
assert idx.shape == (3, 4) and idx.dtype == torch.int32
w = torch.empty(32, 64, device="meta", dtype=torch.bfloat16)
y = torch.ops.sfnn.decode_ffn(x, w, w, idx, None, None, None, 8, "relu")
assert y.shape == (3, 64) and y.dtype == torch.bfloat16
try:
    torch.ops.sfnn.decode_select(torch.zeros(3, 64), torch.zeros(8, 64), None, 4)
    raise SystemExit("a CPU call must not find a kernel")
except NotImplementedError:
    pass
print("OK")
"""


@pytest.mark.slow
@pytest.mark.skipif(GXX is None, reason="g++ is not on PATH: cannot build the emulated binding")
@pytest.mark.parametrize("order", ["python-first", "extension-first"])
def test_emulated_binding_registers_beside_python_ops(jobs, order):
    """binding.cpp, compiled for the CPU over the emulated kernels, loads and registers its two
    schemas as fragments of the sfnn namespace beside sfnn.ops' torch.library.custom_op ops, in
    either import order; the fake kernels of sfnn.cuda_ext trace both ops."""
    rc, log = jobs.result("emu_binding")
    assert rc == 0, f"building binding.cpp over the emulated kernels failed:\n{log[-6000:]}"
    out = subprocess.run([sys.executable, "-c", BINDING_CHECK, order, str(jobs.tmp / "_C.so")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# 4. the built extension on a GPU

needs_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and sfnn.cuda_ext.available()),
    reason=("needs a CUDA GPU and the built extension sfnn._C: "
            + ("no CUDA GPU on this machine" if not torch.cuda.is_available()
               else sfnn.cuda_ext.unavailable_reason())))


@needs_ext
@pytest.mark.parametrize("T", range(1, 16))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_cuda_decode_select(T, dtype):
    gen = _gen(T)
    d, nb, k = 97, 40, 8
    x = torch.randn(T, d, generator=gen).to(dtype).cuda()
    kbar = (torch.randn(nb, d, generator=gen) / d ** 0.5).cuda()
    bbar = (torch.randn(nb, generator=gen) * 0.1).cuda() if T % 2 else None
    out = sfnn.cuda_ext.decode_select(x, kbar, bbar, k)
    _check_selection(out.cpu(), x.float().cpu(), kbar.cpu(),
                     None if bbar is None else bbar.cpu(), k, exact=False)
    xi = torch.randint(-2, 3, (T, d), generator=gen).to(dtype).cuda()
    ki = torch.randint(-2, 3, (nb, d), generator=gen).float().cuda()
    out = sfnn.cuda_ext.decode_select(xi, ki, None, k)
    assert torch.equal(out.cpu(), select_blocks_ref(xi.float().cpu(), ki.cpu(), None, k))


@needs_ext
@pytest.mark.parametrize("T", range(1, 16))
@pytest.mark.parametrize("d_model", [96, 101], ids=["d96", "d101-odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gates", "nogates"])
def test_cuda_decode_ffn(T, d_model, dtype, activation, bias, gated):
    gen = _gen(T + d_model)
    nb, g, k = 12, 16, 4
    d_ff = nb * g
    x = torch.randn(T, d_model, generator=gen).to(dtype)
    keys = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    values = (torch.randn(d_ff, d_model, generator=gen) * d_ff ** -0.5).to(dtype)
    key_bias = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype) if bias else None
    out_bias = (torch.randn(d_model, generator=gen) * 0.1).to(dtype) if bias else None
    gates = torch.rand(T, k, generator=gen) if gated else None
    indices = _indices(T, nb, k, gen, duplicates=T % 2 == 0)
    cuda = [None if t is None else t.cuda() for t in (x, keys, values, indices, key_bias,
                                                      out_bias, gates)]
    y = sfnn.cuda_ext.decode_ffn(*cuda, block_size=g, activation=activation)
    ref = _ffn_ref(x, keys, values, indices, key_bias, out_bias, gates, g, activation)
    assert y.dtype == dtype and y.is_cuda
    atol, rtol = TOLERANCES[dtype]
    assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol, name="y")
    assert torch.equal(y, sfnn.cuda_ext.decode_ffn(*cuda, block_size=g, activation=activation))


@needs_ext
def test_cuda_ops_opcheck():
    gen = _gen(0)
    x = torch.randn(3, 64, generator=gen).cuda()
    kbar = torch.randn(8, 64, generator=gen).cuda()
    keys = torch.randn(32, 64, generator=gen).cuda()
    idx = torch.tensor([[0, 1], [2, 3], [1, 1]], dtype=torch.int32).cuda()
    torch.library.opcheck(torch.ops.sfnn.decode_select.default, (x, kbar, None, 3))
    torch.library.opcheck(torch.ops.sfnn.decode_ffn.default,
                          (x, keys, keys, idx, None, None, None, 8, "gelu"))


# ---------------------------------------------------------------------------------------------
# 5. here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_here_says_how_to_build():
    assert sfnn.cuda_ext.available() is False
    reason = sfnn.cuda_ext.unavailable_reason()
    assert "SFNN_BUILD_CUDA=1 pip install --no-build-isolation -e ." in reason, reason
    with pytest.raises(RuntimeError, match="SFNN_BUILD_CUDA=1"):
        sfnn.cuda_ext.decode_select(torch.zeros(1, 4), torch.zeros(2, 4), None, 1)
