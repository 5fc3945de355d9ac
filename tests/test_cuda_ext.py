"""The CUDA C++ extension (csrc/, sfnn/cuda_ext.py), proven without a GPU as far as possible.

1. Every csrc/*.cu compiles alone with nvcc for sm_80 and sm_90 and ptxas reports no spills and
   no stack frame.
2. Every csrc/*.cpp passes ``g++ -fsyntax-only`` against the CPU torch headers + CUDA's include.
3. Emulated: csrc/decode.cu, compiled by g++ against the test-only CPU emulator in
   tests/cuda_emu/ (each CUDA thread a fiber, several thread blocks resident at once), runs its
   real kernel and launchers on CPU tensors, checked against sfnn.reference (selection exactly,
   outputs within tolerance), with poisoned workspaces (an emulated initcheck counts reads of
   words no thread wrote), bitwise equal however the thread blocks interleave; plus the
   launchers' limits and their messages.
4. On a GPU with the extension built, the registered ops against sfnn.reference, and a decode
   step captured in a CUDA graph and replayed.
5. Here, sfnn.cuda_ext says it is unavailable and how to build it.
The compilers run in parallel, started once per module; nvcc dominates the file's time.
`-m "not slow"` skips the binding build.
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
EMU = Path(__file__).resolve().parent / "cuda_emu"
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
        sources = [EMU / "decode_emu.cpp", EMU / "emu.h", *CU_FILES, *CSRC.glob("*.h")]
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
        j.emu_lib = tmp / f"decode_emu_{digest}.so"
        emu_flags = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                     "-U_FORTIFY_SOURCE", f"-I{EMU}", f"-I{CSRC}"]
        j.start("emu", [GXX, *emu_flags, "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
                        str(EMU / "decode_emu.cpp"), "-o", str(j.emu_lib)])
        if any("binding_registers" in item.nodeid for item in request.session.items):
            from torch.utils.cpp_extension import include_paths

            lib_dir = Path(torch.__file__).parent / "lib"
            j.start("emu_binding", [
                GXX, *emu_flags, *[f"-I{p}" for p in include_paths()],
                f"-I{sysconfig.get_paths()['include']}", str(CSRC / "binding.cpp"),
                str(EMU / "decode_emu.cpp"), "-o", str(tmp / "_C.so"), f"-L{lib_dir}", "-ltorch",
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
        assert info["stack"] == 0, f"{cu.name} sm_{arch}: {name} uses local memory: {info}"
    short = {n: re.sub(r"^_ZN.*?(decode_\w+?_kernel)(I.*?E)?E.*$", r"\1\2", n) for n in kernels}
    print(f"\n{cu.name} sm_{arch}: " + ", ".join(
        f"{short[n]}:{i['registers']}r" for n, i in kernels.items()))


def test_emulator_stays_out_of_the_build_and_the_seam_is_the_only_way_in():
    # setup.py builds glob("csrc/*.cu") + glob("csrc/*.cpp"): the emulator lives in the tests.
    assert [p.name for p in CU_FILES] == ["decode.cu"]
    assert sorted(p.name for p in CSRC.iterdir()) == ["binding.cpp", "decode.cu", "decode.h"]
    assert (EMU / "emu.h").exists() and (EMU / "decode_emu.cpp").exists()
    # Every launch and all shared memory go through the two macros the emulator redefines (the
    # emulator also rejects a static __shared__ at compile time).
    for cu in CU_FILES:
        for n, line in enumerate(cu.read_text().splitlines(), 1):
            if "<<<" in line:
                assert line.startswith("#define SFNN_LAUNCH("), f"{cu.name}:{n}: {line}"
            if "__shared__" in line and not line.lstrip().startswith("//"):
                assert line.startswith("#define SFNN_DYNAMIC_SMEM("), f"{cu.name}:{n}: {line}"


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
    """ctypes front end to the emulated launchers, with the binding's conventions: poisoned
    outputs and workspaces, and after every call no initcheck violation (no read of a
    workspace word that no thread wrote)."""

    def __init__(self, path: Path, sm_count: int = 8):
        lib = ctypes.CDLL(str(path))
        vp, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
        lib.sfnn_decode_last_error.restype = ctypes.c_char_p
        lib.sfnn_decode_last_error.argtypes = []
        lib.sfnn_decode_select_workspace_bytes.restype = sz
        lib.sfnn_decode_select_workspace_bytes.argtypes = [i64, i64, i64, i64, i32]
        lib.sfnn_decode_select.restype = i32
        lib.sfnn_decode_select.argtypes = [vp, i32, i64, vp, i32, i64, vp, i64, i64, i64, i64,
                                           vp, i64, vp, sz, vp]
        lib.sfnn_decode_ffn_workspace_bytes.restype = sz
        lib.sfnn_decode_ffn_workspace_bytes.argtypes = [i64, i64, i64, i64, i32]
        lib.sfnn_decode_ffn.restype = i32
        lib.sfnn_decode_ffn.argtypes = [vp, i64, vp, i64, vp, i64, vp, i64, vp, vp, vp, i64, vp,
                                        i64, i32, i32, i64, i64, i64, i64, i64, vp, sz, vp]
        lib.sfnn_decode_ffn_gated.restype = i32
        lib.sfnn_decode_ffn_gated.argtypes = lib.sfnn_decode_ffn.argtypes + [vp, i64, vp]
        lib.sfnn_decode_step_workspace_bytes.restype = sz
        lib.sfnn_decode_step_workspace_bytes.argtypes = [i64, i64, i64, i64, i64, i32]
        lib.sfnn_decode_step.restype = i32
        lib.sfnn_decode_step.argtypes = [vp, i64, vp, i32, i64, vp, vp, i64, vp, i64, vp, vp, vp,
                                         i64, vp, i64, i32, i32, i64, i64, i64, i64, i64, vp, sz,
                                         vp]
        lib.sfnn_emu_configure.argtypes = [i32, i32, i32]
        lib.sfnn_emu_take_initcheck_violations.restype = ctypes.c_long
        lib.sfnn_emu_last_launch.argtypes = [vp]
        lib.sfnn_emu_selftest.restype = i32
        lib.sfnn_emu_selftest.argtypes = [i32, vp]
        lib.sfnn_emu_set_sm_count(sm_count)
        self.lib = lib
        self.configure()

    def configure(self, resident: int = 1, dry_run: bool = False, initcheck: bool = True):
        """Thread blocks resident at once, launch validation only, workspace initcheck."""
        self.lib.sfnn_emu_configure(resident, int(dry_run), int(initcheck))

    def last_error(self) -> str:
        return self.lib.sfnn_decode_last_error().decode()

    def last_launch(self) -> tuple[int, int, int]:
        """(thread blocks, threads per block, bytes of dynamic shared memory) of the last
        valid launch."""
        out = (ctypes.c_ulonglong * 3)()
        self.lib.sfnn_emu_last_launch(ctypes.addressof(out))
        return tuple(out)

    @staticmethod
    def _ptr(t):
        return None if t is None else t.data_ptr()

    @staticmethod
    def _stride(t):
        return t.stride(0) if t.shape[0] > 1 else 0

    @staticmethod
    def _workspace(n):
        buf = torch.full((n + 256,), 0xCD, dtype=torch.uint8)  # poisoned (emu.h's poison32)
        off = (-buf.data_ptr()) % 256
        return buf, buf.data_ptr() + off

    def _check(self, err, name):
        assert err == 0, f"{name} returned {err}: {self.last_error()}"
        bad = self.lib.sfnn_emu_take_initcheck_violations()
        assert bad == 0, f"{name} read {bad} never-written workspace words"

    def select(self, x, kbar, bbar, top_k):
        T, d = x.shape
        nb = kbar.shape[0]
        out = torch.full((T, top_k), -7, dtype=torch.int32)
        n = self.lib.sfnn_decode_select_workspace_bytes(T, nb, d, top_k, 0)
        buf, ws = self._workspace(n)
        err = self.lib.sfnn_decode_select(
            self._ptr(x), DTYPE_TAG[x.dtype], self._stride(x), self._ptr(kbar),
            DTYPE_TAG[kbar.dtype], self._stride(kbar), self._ptr(bbar), T, nb, d, top_k,
            self._ptr(out), out.stride(0), ws, n, None)
        self._check(err, "sfnn_decode_select")
        return out

    def ffn(self, x, keys, values, indices, key_bias, out_bias, gates, block_size, activation,
            gate_keys=None, gate_bias=None):
        """The block FFN; with gate_keys (and gate_bias) given, sfnn_decode_ffn_gated."""
        T, d = x.shape
        top_k = indices.shape[1]
        y = torch.full((T, d), float("nan"), dtype=x.dtype)  # poisoned
        n = self.lib.sfnn_decode_ffn_workspace_bytes(T, top_k, block_size, d, 0)
        buf, ws = self._workspace(n)
        args = (
            self._ptr(x), self._stride(x), self._ptr(keys), self._stride(keys),
            self._ptr(values), self._stride(values), self._ptr(indices), self._stride(indices),
            self._ptr(key_bias), self._ptr(out_bias), self._ptr(gates),
            0 if gates is None else self._stride(gates), self._ptr(y), y.stride(0),
            DTYPE_TAG[x.dtype], ACT_TAG[activation], T, top_k, keys.shape[0] // block_size,
            block_size, d, ws, n, None)
        if gate_keys is None and gate_bias is None:
            self._check(self.lib.sfnn_decode_ffn(*args), "sfnn_decode_ffn")
        else:
            gk_stride = 0 if gate_keys is None else self._stride(gate_keys)
            err = self.lib.sfnn_decode_ffn_gated(*args, self._ptr(gate_keys), gk_stride,
                                                 self._ptr(gate_bias))
            self._check(err, "sfnn_decode_ffn_gated")
        return y

    def step(self, x, kbar, bbar, keys, values, key_bias, out_bias, top_k, block_size,
             activation):
        T, d = x.shape
        nb = kbar.shape[0]
        y = torch.full((T, d), float("nan"), dtype=x.dtype)
        idx = torch.full((T, top_k), -7, dtype=torch.int32)
        n = self.lib.sfnn_decode_step_workspace_bytes(T, nb, block_size, d, top_k, 0)
        buf, ws = self._workspace(n)
        err = self.lib.sfnn_decode_step(
            self._ptr(x), self._stride(x), self._ptr(kbar), DTYPE_TAG[kbar.dtype],
            self._stride(kbar), self._ptr(bbar), self._ptr(keys), self._stride(keys),
            self._ptr(values), self._stride(values), self._ptr(key_bias), self._ptr(out_bias),
            self._ptr(idx), idx.stride(0), self._ptr(y), y.stride(0), DTYPE_TAG[x.dtype],
            ACT_TAG[activation], T, nb, block_size, d, top_k, ws, n, None)
        self._check(err, "sfnn_decode_step")
        return y, idx


@pytest.fixture(scope="module")
def emu(jobs):
    if GXX is None:
        pytest.skip("g++ is not on PATH: cannot build the CPU emulation of csrc/decode.cu")
    rc, log = jobs.result("emu")
    assert rc == 0, f"building the emulated decode.cu failed:\n{log[-6000:]}"
    e = EmuDecode(jobs.emu_lib)
    yield e
    e.configure()


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


def _select_inputs(T, d_model, n_blocks, dtype, kbar_dtype, integer, gen):
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
    return x, kbar.to(kbar_dtype), bbar


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


@pytest.mark.parametrize("kbar_dtype", [torch.float32, torch.bfloat16], ids=["kbar32", "kbar16"])
@pytest.mark.parametrize("T, d_model, n_blocks, top_k, dtype, layout, integer", SELECT_CASES)
def test_emulated_decode_select(emu, T, d_model, n_blocks, top_k, dtype, layout, integer,
                                kbar_dtype):
    gen = _gen(T * 1000 + d_model + n_blocks)
    x, kbar, bbar = _select_inputs(T, d_model, n_blocks, dtype, kbar_dtype, integer, gen)
    x = _strided(x, layout, gen)
    kbar = _strided(kbar, layout, gen)
    bbar_arg = bbar if T % 2 == 0 else None
    out = emu.select(x, kbar, bbar_arg, top_k)
    # A bf16 kbar is the cache's rounding of the means: the scores are those of the rounded kbar.
    _check_selection(out, x.float(), kbar.float(), bbar_arg, top_k, exact=integer)
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


def _ffn_tables(T, d_model, d_ff, dtype, gen):
    x = torch.randn(T, d_model, generator=gen).to(dtype)
    keys = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    values = (torch.randn(d_ff, d_model, generator=gen) * d_ff ** -0.5).to(dtype)
    key_bias = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype)
    out_bias = (torch.randn(d_model, generator=gen) * 0.1).to(dtype)
    return x, keys, values, key_bias, out_bias


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
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d_model, d_ff, dtype, gen)
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


def _gated_ffn_ref(x, keys, values, gate_keys, indices, key_bias, gate_bias, out_bias, gates,
                   block_size, activation):
    """The gated block FFN in float64 (PLAN.md's protocol): per (token, slot) the block's rows
    give h = act(x . kg + bg) * (x . k + b), y = sum_slots gate * h v + out_bias."""
    up = [None if t is None else t.detach().double()
          for t in (x, keys, values, gate_keys, key_bias, gate_bias, out_bias)]
    x, keys, values, gate_keys, key_bias, gate_bias, out_bias = up
    T, d = x.shape
    g = block_size
    y = torch.zeros(T, d, dtype=torch.float64) if out_bias is None else out_bias.repeat(T, 1)
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[activation]
    for t in range(T):
        for j in range(indices.shape[1]):
            rows = slice(int(indices[t, j]) * g, (int(indices[t, j]) + 1) * g)
            a_g = gate_keys[rows] @ x[t] + (0 if gate_bias is None else gate_bias[rows])
            a_u = keys[rows] @ x[t] + (0 if key_bias is None else key_bias[rows])
            h = act(a_g) * a_u * (1.0 if gates is None else float(gates[t, j]))
            y[t] += h @ values[rows]
    return y


@pytest.mark.parametrize("T, d_model, n_blocks, block_size, top_k, layout, duplicates, dtype",
                         FFN_CASES)
def test_emulated_decode_gated_ffn(emu, T, d_model, n_blocks, block_size, top_k, layout,
                                   duplicates, dtype):
    """sfnn_decode_ffn_gated (issue 11's gated FFN, forward only) against a float64 reference:
    every activation, biases and selection gates on and off, vector and scalar loads (strided
    and misaligned tables), duplicate blocks, and bitwise repeatable."""
    gen = _gen(T * 100 + d_model + block_size + 1)
    d_ff = n_blocks * block_size
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d_model, d_ff, dtype, gen)
    gate_keys = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    gate_bias = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype)
    gates = torch.rand(T, top_k, generator=gen)
    indices = _indices(T, n_blocks, top_k, gen, duplicates)
    x, keys, values, gate_keys = (_strided(t, layout, gen) for t in (x, keys, values, gate_keys))
    atol, rtol = TOLERANCES[dtype]
    for i, activation in enumerate(("relu", "gelu", "silu")):
        bias, gated = i != 1, i != 2
        args = (x, keys, values, indices, key_bias if bias else None, out_bias if bias else None,
                gates if gated else None, block_size, activation)
        gk = dict(gate_keys=gate_keys, gate_bias=gate_bias if bias else None)
        y = emu.ffn(*args, **gk)
        want = _gated_ffn_ref(x, keys, values, gate_keys, indices, args[4], gk["gate_bias"],
                              args[5], args[6], block_size, activation)
        assert y.dtype == dtype
        assert_close(y.double(), want, atol=atol, rtol=rtol,
                     name=f"gated y[{activation}, bias={bias}, gates={gated}]")
        if i == 0:
            assert torch.equal(y, emu.ffn(*args, **gk)), "not deterministic"
            # the gate table matters: the plain FFN's output differs
            assert not torch.allclose(y, emu.ffn(*args), atol=atol, rtol=rtol)


def test_emulated_decode_gated_ffn_rejects_gate_bias_alone(emu):
    x = torch.zeros(1, 8)
    keys = torch.zeros(8, 8)
    idx = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(AssertionError, match="gate_bias without gate_keys"):
        emu.ffn(x, keys, keys, idx, None, None, None, 8, "relu", gate_bias=torch.zeros(8))


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


STEP_CASES = [
    # T, d_model, n_blocks, block_size, top_k, dtype, kbar dtype, layout
    pytest.param(1, 64, 12, 16, 3, torch.bfloat16, torch.bfloat16, "contig",
                 id="T1-d64-nb12-g16-k3-bf16-kbar16"),
    pytest.param(1, 64, 12, 16, 3, torch.float32, torch.float32, "contig",
                 id="T1-d64-nb12-g16-k3-f32-kbar32"),
    pytest.param(4, 37, 9, 8, 4, torch.float16, torch.float32, "contig",
                 id="T4-d37-nb9-g8-k4-f16-odd"),
    pytest.param(15, 75, 10, 4, 2, torch.bfloat16, torch.float32, "padded",
                 id="T15-d75-nb10-g4-k2-bf16-padded"),
    pytest.param(17, 40, 6, 8, 6, torch.float32, torch.bfloat16, "offset",
                 id="T17-d40-nb6-g8-k6-f32-misaligned-dense-two-tiles"),
]


@pytest.mark.parametrize("T, d_model, n_blocks, block_size, top_k, dtype, kbar_dtype, layout",
                         STEP_CASES)
def test_emulated_decode_step(emu, T, d_model, n_blocks, block_size, top_k, dtype, kbar_dtype,
                              layout):
    """The fused step (select + block FFN + combine in one launch) against the reference: the
    indices are exactly the reference's selection on exact (integer) scores, y is the block FFN
    over them, for every activation with and without biases."""
    gen = _gen(T * 10 + d_model + n_blocks)
    d_ff = n_blocks * block_size
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d_model, d_ff, dtype, gen)
    x = torch.randint(-2, 3, (T, d_model), generator=gen).to(dtype) / 4  # exact scores
    kbar = (torch.randint(-3, 4, (n_blocks, d_model), generator=gen) / 8).to(kbar_dtype)
    kbar[n_blocks // 2] = kbar[0]  # an exact tie
    bbar = torch.randint(-2, 3, (n_blocks,), generator=gen).float() / 2
    x, keys, values, kbar = (_strided(t, layout, gen) for t in (x, keys, values, kbar))
    atol, rtol = TOLERANCES[dtype]
    for i, activation in enumerate(("relu", "gelu", "silu")):
        bias = i != 1
        args = dict(key_bias=key_bias if bias else None, out_bias=out_bias if bias else None)
        b_arg = bbar if bias else None
        y, idx = emu.step(x, kbar, b_arg, keys, values, top_k=top_k, block_size=block_size,
                          activation=activation, **args)
        ref_idx = select_blocks_ref(x.float(), kbar.float(), b_arg, top_k)
        assert torch.equal(idx, ref_idx), f"\n{idx}\n!=\n{ref_idx}"
        ref = _ffn_ref(x, keys, values, ref_idx, args["key_bias"], args["out_bias"], None,
                       block_size, activation)
        assert y.dtype == dtype
        assert_close(y.double(), ref, atol=atol, rtol=rtol, name=f"y[{activation}, bias={bias}]")


def test_emulated_decode_is_bitwise_the_same_however_blocks_interleave(emu):
    """With 1, 3 and 7 thread blocks resident at once (interleaved fiber by fiber), every phase
    that waits for another sees its results complete: the same bits every time."""
    gen = _gen(11)
    T, d, nb, g, k = 5, 72, 16, 8, 4
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d, nb * g, torch.bfloat16, gen)
    kbar = torch.randn(nb, d, generator=gen) / d ** 0.5
    bbar = torch.randn(nb, generator=gen) * 0.1
    idx_in = _indices(T, nb, k, gen, duplicates=True)
    results = []
    for resident in (1, 3, 7):
        emu.configure(resident=resident)
        step = emu.step(x, kbar, bbar, keys, values, key_bias, out_bias, k, g, "gelu")
        sel = emu.select(x, kbar, bbar, k)
        ffn = emu.ffn(x, keys, values, idx_in, key_bias, out_bias, None, g, "silu")
        results.append((*step, sel, ffn))
    emu.configure()
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    # The step is bitwise select followed by ffn (the binding's docstring promises it).
    y, idx, sel, _ = results[0]
    assert torch.equal(idx, sel)
    assert torch.equal(y, emu.ffn(x, keys, values, sel, key_bias, out_bias, None, g, "gelu"))


def test_emulator_self_checks(emu):
    """The emulator finds what it claims to find: a wait on a block that has not started
    deadlocks when blocks run one at a time and runs when they are resident together; a
    divergent barrier fails the launch; a poisoned word read through __ldcg counts."""
    lib = emu.lib
    lib.sfnn_emu_error_text.restype = ctypes.c_char_p
    flags = torch.zeros(2, dtype=torch.int32)
    emu.configure(resident=1)
    assert lib.sfnn_emu_selftest(0, flags.data_ptr()) != 0
    assert "every resident block (1) spins" in lib.sfnn_emu_error_text().decode()
    assert flags.tolist() == [0, 0]  # block 1 never started
    flags.zero_()
    emu.configure(resident=2)
    assert lib.sfnn_emu_selftest(0, flags.data_ptr()) == 0
    assert flags.tolist() == [1, 1]
    emu.configure(resident=1)
    assert lib.sfnn_emu_selftest(1, flags.data_ptr()) != 0
    assert "is not reached by every live thread" in lib.sfnn_emu_error_text().decode()
    lib.sfnn_emu_take_initcheck_violations()
    flags.fill_(-0x32323233)  # 0xCDCDCDCD, the poison
    assert lib.sfnn_emu_selftest(2, flags.data_ptr()) == 0
    assert flags[1] == 1 and lib.sfnn_emu_take_initcheck_violations() == 1
    flags[0] = 0
    assert lib.sfnn_emu_selftest(2, flags.data_ptr()) == 0
    assert flags[1] == 0 and lib.sfnn_emu_take_initcheck_violations() == 0
    emu.configure()


def test_emulated_launcher_limits_say_which(emu):
    """Arguments past a limit fail with cudaErrorInvalidValue (1) before any launch, and
    sfnn_decode_last_error() names the limit (the binding raises with that text)."""
    lib = emu.lib
    lib.sfnn_emu_take_initcheck_violations()
    x = torch.zeros(8, dtype=torch.float32)
    ws = torch.zeros(1024, dtype=torch.uint8)
    p, w = x.data_ptr(), ws.data_ptr() + (-ws.data_ptr()) % 256

    def ffn(T, top_k, g=4, d=8, nb=4, ws_bytes=512):
        return lib.sfnn_decode_ffn(p, 0, p, d, p, d, p, top_k, None, None, None, 0, p, d, 0, 0,
                                   T, top_k, nb, g, d, w, ws_bytes, None)

    assert ffn(70_000, 1) == 1
    assert "T=70000 tokens is past the decode kernels' limit of 65535" in emu.last_error()
    assert lib.sfnn_decode_ffn_workspace_bytes(70_000, 1, 4, 8, 0) == 0
    assert "65535" in emu.last_error()
    assert ffn(65_535, 40_000) == 1  # 2.6e9 slots
    assert "past CUDA's grid limit of 2147483647" in emu.last_error(), emu.last_error()
    assert ffn(1, 2, ws_bytes=16) == 1
    assert "workspace must be 256-byte aligned and hold >=" in emu.last_error()
    assert lib.sfnn_decode_select(p, 0, 0, p, 0, 0, None, 1, 4, 8, 5, p, 0, w, 512, None) == 1
    assert "top_k must be in [1, 4], got 5" in emu.last_error()
    assert lib.sfnn_decode_select(p, 0, 0, p, 1, 0, None, 1, 4, 8, 2, p, 0, w, 512, None) == 1
    assert "kbar dtype tag 1" in emu.last_error()  # fp16 kbar: only fp32 or bf16


@pytest.mark.parametrize("top_k", [45_057, 49_152, 70_000])
def test_emulated_decode_ffn_large_top_k_fits_shared_memory(emu, top_k):
    """Issue 18.3: top_k in 45,057..49,152 asked for top_k bytes of dynamic shared memory on top
    of 4 KiB static and failed with "invalid argument". The flags are in the workspace now: the
    launch's shared memory does not grow with top_k and stays within the 48 KiB a launch gets
    without opting in (the emulator rejects more, as a GPU does). Dry run: launches are checked,
    not run."""
    T, d, g = 1, 8, 4
    x = torch.zeros(T, d)
    keys = torch.zeros(top_k * g, d)
    idx = torch.arange(top_k, dtype=torch.int32).view(1, top_k)
    emu.configure(dry_run=True)
    try:
        emu.ffn(x, keys, keys, idx, None, None, None, g, "relu")
        blocks, threads, smem = emu.last_launch()
        emu.ffn(x, keys, keys, idx[:, :200], None, None, None, g, "relu")
        assert emu.last_launch()[2] == smem  # no top_k-sized buffer
        kbar = torch.zeros(top_k, d)
        emu.step(x, kbar, None, keys, keys, None, None, top_k, g, "relu")
        assert emu.last_launch()[2] <= 48 * 1024
    finally:
        emu.configure()
    assert smem <= 48 * 1024 and threads == 256
    assert blocks == top_k + T  # a block per slot, one to combine


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
assert ("Tensor? gates, int block_size, str activation, Tensor? gate_keys=None, "
        "Tensor? gate_bias=None) -> Tensor") in str(torch.ops.sfnn.decode_ffn.default._schema)
assert "int top_k, int block_size, str activation) -> (Tensor, Tensor)" in str(
    torch.ops.sfnn.decode_step.default._schema)
assert hasattr(torch.ops.sfnn, "block_ffn")  # the op layer's Python ops share the namespace
sfnn.cuda_ext._register_fakes()
x = torch.empty(3, 64, device="meta", dtype=torch.bfloat16)
idx = torch.ops.sfnn.decode_select(x, torch.empty(8, 64, device="meta"), None, 4)
assert idx.shape == (3, 4) and idx.dtype == torch.int32
w = torch.empty(32, 64, device="meta", dtype=torch.bfloat16)
y = torch.ops.sfnn.decode_ffn(x, w, w, idx, None, None, None, 8, "relu")
assert y.shape == (3, 64) and y.dtype == torch.bfloat16
y = torch.ops.sfnn.decode_ffn(x, w, w, idx, None, None, None, 8, "silu", w, None)  # gated
assert y.shape == (3, 64) and y.dtype == torch.bfloat16
kb = torch.empty(4, 64, device="meta", dtype=torch.bfloat16)
y, idx = torch.ops.sfnn.decode_step(x, kb, None, w, w, None, None, 2, 8, "gelu")
assert y.shape == (3, 64) and y.dtype == torch.bfloat16 and idx.shape == (3, 2)
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
    """binding.cpp, compiled for the CPU over the emulated kernels, loads and registers its three
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
@pytest.mark.parametrize("kbar_dtype", [torch.float32, torch.bfloat16], ids=["kbar32", "kbar16"])
def test_cuda_decode_select(T, dtype, kbar_dtype):
    gen = _gen(T)
    d, nb, k = 97, 40, 8
    x = torch.randn(T, d, generator=gen).to(dtype).cuda()
    kbar = (torch.randn(nb, d, generator=gen) / d ** 0.5).to(kbar_dtype).cuda()
    bbar = (torch.randn(nb, generator=gen) * 0.1).cuda() if T % 2 else None
    out = sfnn.cuda_ext.decode_select(x, kbar, bbar, k)
    _check_selection(out.cpu(), x.float().cpu(), kbar.float().cpu(),
                     None if bbar is None else bbar.cpu(), k, exact=False)
    xi = torch.randint(-2, 3, (T, d), generator=gen).to(dtype).cuda()
    ki = torch.randint(-2, 3, (nb, d), generator=gen).to(kbar_dtype).cuda()
    out = sfnn.cuda_ext.decode_select(xi, ki, None, k)
    assert torch.equal(out.cpu(), select_blocks_ref(xi.float().cpu(), ki.float().cpu(), None, k))


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
@pytest.mark.parametrize("T", [1, 3, 15])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_decode_gated_ffn(T, dtype, activation, bias):
    """sfnn::decode_ffn with gate_keys/gate_bias (the gated FFN) on a GPU, against the float64
    gated reference."""
    gen = _gen(T + 7)
    nb, g, k, d_model = 12, 16, 4, 96
    d_ff = nb * g
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d_model, d_ff, dtype, gen)
    gate_keys = (torch.randn(d_ff, d_model, generator=gen) * d_model ** -0.5).to(dtype)
    gate_bias = (torch.randn(d_ff, generator=gen) * 0.1).to(dtype) if bias else None
    key_bias, out_bias = (key_bias, out_bias) if bias else (None, None)
    gates = torch.rand(T, k, generator=gen)
    indices = _indices(T, nb, k, gen, duplicates=T % 2 == 1)
    cuda = [None if t is None else t.cuda() for t in (x, keys, values, indices, key_bias,
                                                      out_bias, gates, gate_keys, gate_bias)]
    y = sfnn.cuda_ext.decode_ffn(*cuda[:7], block_size=g, activation=activation,
                                 gate_keys=cuda[7], gate_bias=cuda[8])
    ref = _gated_ffn_ref(x, keys, values, gate_keys, indices, key_bias, gate_bias, out_bias,
                         gates, g, activation)
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype
    assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol, name="gated y")


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
    torch.library.opcheck(torch.ops.sfnn.decode_step.default,
                          (x, kbar.bfloat16(), None, keys, keys, None, None, 3, 4, "silu"))


def _step_problem(T, d_model, n_blocks, g, dtype, kbar_dtype, seed, exact):
    gen = _gen(seed)
    x, keys, values, key_bias, out_bias = _ffn_tables(T, d_model, n_blocks * g, dtype, gen)
    kbar = keys.float().view(n_blocks, g, d_model).mean(1)
    bbar = key_bias.float().view(n_blocks, g).mean(1)
    if exact:  # exact scores in any summation order: the selection must equal the reference's
        x = (torch.randint(-2, 3, (T, d_model), generator=gen) / 4).to(dtype)
        kbar = torch.randint(-3, 4, (n_blocks, d_model), generator=gen) / 8
        bbar = torch.randint(-2, 3, (n_blocks,), generator=gen) / 2
    return x, kbar.to(kbar_dtype), bbar, keys, values, key_bias, out_bias


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 2, 7, 15])
@pytest.mark.parametrize("shape", [(96, 12, 16, 4), (101, 40, 8, 8), (4096, 256, 64, 32)],
                         ids=["d96-nb12-g16-k4", "d101-nb40-g8-k8-odd", "d4096-nb256-g64-k32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("kbar_dtype", [torch.float32, torch.bfloat16], ids=["kbar32", "kbar16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_cuda_decode_step(T, shape, dtype, kbar_dtype, activation):
    d, nb, g, k = shape
    x, kbar, bbar, keys, values, key_bias, out_bias = _step_problem(
        T, d, nb, g, dtype, kbar_dtype, seed=T + d, exact=True)
    cuda = [t.cuda() for t in (x, kbar, bbar, keys, values, key_bias, out_bias)]
    y, idx = sfnn.cuda_ext.decode_step(*cuda, top_k=k, block_size=g, activation=activation)
    ref_idx = select_blocks_ref(x.float(), kbar.float(), bbar, k)
    assert torch.equal(idx.cpu(), ref_idx)
    ref = _ffn_ref(x, keys, values, ref_idx, key_bias, out_bias, None, g, activation)
    atol, rtol = TOLERANCES[dtype]
    assert_close(y.double().cpu(), ref, atol=atol, rtol=rtol, name="y")
    # bitwise select + ffn, and the same bits on every run (the phases hand over complete data)
    sel = sfnn.cuda_ext.decode_select(cuda[0], cuda[1], cuda[2], k)
    y2 = sfnn.cuda_ext.decode_ffn(cuda[0], cuda[3], cuda[4], sel, cuda[5], cuda[6], None,
                                  block_size=g, activation=activation)
    assert torch.equal(sel, idx) and torch.equal(y2, y)
    for _ in range(20):
        y3, idx3 = sfnn.cuda_ext.decode_step(*cuda, top_k=k, block_size=g, activation=activation)
        assert torch.equal(y3, y) and torch.equal(idx3, idx)


@needs_ext
@pytest.mark.cuda
@pytest.mark.parametrize("kbar_dtype", [torch.float32, torch.bfloat16], ids=["kbar32", "kbar16"])
def test_cuda_decode_step_in_a_cuda_graph(kbar_dtype):
    """The decode step (one memset + one launch, no host sync) captured once and replayed with
    new tokens gives what eager calls give."""
    T, d, nb, g, k = 1, 4096, 256, 64, 32
    x, kbar, bbar, keys, values, key_bias, out_bias = (
        t.cuda() for t in _step_problem(T, d, nb, g, torch.bfloat16, kbar_dtype, 5, False))
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        sfnn.cuda_ext.decode_step(static_x, kbar, bbar, keys, values, key_bias, out_bias,
                                  top_k=k, block_size=g, activation="gelu")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y, static_idx = sfnn.cuda_ext.decode_step(
            static_x, kbar, bbar, keys, values, key_bias, out_bias, top_k=k, block_size=g,
            activation="gelu")
    gen = _gen(9)
    for _ in range(5):
        new_x = torch.randn(T, d, generator=gen).to(torch.bfloat16).cuda()
        static_x.copy_(new_x)
        graph.replay()
        y, idx = sfnn.cuda_ext.decode_step(new_x, kbar, bbar, keys, values, key_bias, out_bias,
                                           top_k=k, block_size=g, activation="gelu")
        torch.cuda.synchronize()
        assert torch.equal(static_idx, idx) and torch.equal(static_y, y)


@needs_ext
@pytest.mark.cuda
def test_cuda_decode_limits_say_which():
    x = torch.zeros(70_000, 64, device="cuda")
    with pytest.raises(RuntimeError, match="past the decode kernels' limit of 65535 tokens"):
        sfnn.cuda_ext.decode_select(x, torch.zeros(8, 64, device="cuda"), None, 2)


# ---------------------------------------------------------------------------------------------
# 5. here


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_here_says_how_to_build():
    assert sfnn.cuda_ext.available() is False
    reason = sfnn.cuda_ext.unavailable_reason()
    assert "SFNN_BUILD_CUDA=1 pip install --no-build-isolation -e ." in reason, reason
    with pytest.raises(RuntimeError, match="SFNN_BUILD_CUDA=1"):
        sfnn.cuda_ext.decode_select(torch.zeros(1, 4), torch.zeros(2, 4), None, 1)
