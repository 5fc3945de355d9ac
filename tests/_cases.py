"""Problem builders shared by the test files."""
from __future__ import annotations

import torch


def make_problem(T, d_model, d_ff, *, bias=True, dtype=torch.float32, device="cpu",
                 requires_grad=False, scale=1.0):
    """Random x (T, d_model), keys, values (d_ff, d_model), key_bias, out_bias (or None)."""
    g = torch.Generator().manual_seed(1234 + T * 7 + d_model * 13 + d_ff)

    def rnd(*shape, s=1.0):
        t = (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    x = rnd(T, d_model, s=scale)
    keys = rnd(d_ff, d_model, s=d_model ** -0.5)
    values = rnd(d_ff, d_model, s=d_ff ** -0.5)
    key_bias = rnd(d_ff, s=0.1) if bias else None
    out_bias = rnd(d_model, s=0.1) if bias else None
    return x, keys, values, key_bias, out_bias


def upcast(*tensors, dtype=torch.float64):
    """Detached copies in ``dtype`` that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


def backend_device(backend: str) -> str:
    """Where a backend's tests run: Triton on the GPU when there is one, else in the interpreter
    on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1 only when there is no GPU)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
