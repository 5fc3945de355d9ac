"""Comparison helpers shared by the test suite and the benchmarks."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype for outputs and gradients compared against the reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Max-abs error, relative norm error and NaN mismatches of ``actual`` against ``expected``."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    nan_mismatch = int((nan_a != nan_e).sum())
    both = ~(nan_a | nan_e)
    diff = (a - e)[both].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    denom = float(e[both].norm()) or 1.0
    rel = float((a - e)[both].norm()) / denom if diff.numel() else 0.0
    return f"max_abs={max_abs:.3e} rel_norm={rel:.3e} nan_mismatch={nan_mismatch}"


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "tensor",
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, NaN where NaN.

    The tolerances default to :data:`TOLERANCES` for ``actual``'s dtype. On failure the message
    names the tensor and gives the max-abs error, relative norm error and NaN mismatches.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    d_atol, d_rtol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise AssertionError(
            f"{name}: {bad}/{a.numel()} elements differ beyond atol={atol:g} rtol={rtol:g}; "
            + error_report(actual, expected)
        )
