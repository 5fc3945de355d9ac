"""Activations and their derivatives, shared by the reference and the torch path."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "silu")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def apply_activation(a: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(a)`` for ``activation`` in :data:`ACTIVATIONS` (gelu is the exact erf form)."""
    if activation == "relu":
        return F.relu(a)
    if activation == "gelu":
        return F.gelu(a)
    if activation == "silu":
        return F.silu(a)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(a: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(a)``, elementwise, in ``a``'s dtype."""
    if activation == "relu":
        return (a > 0).to(a.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * _INV_SQRT2))
        return cdf + a * torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    if activation == "silu":
        s = torch.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
