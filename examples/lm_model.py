"""The GPT-style decoder of ``pretrain_lm.py`` and its feed-forward variants.

Pre-norm blocks (LayerNorm -> causal self-attention through
``torch.nn.functional.scaled_dot_product_attention`` -> residual; LayerNorm -> FFN -> residual),
learned absolute positions, a final LayerNorm and an output layer tied to the token embedding.

Every FFN variant has the same number of **active cells per token**, ``active``:

- ``dense``: ``nn.Linear(d_model, active) -> gelu -> nn.Linear(active, d_model)``;
- a sparse variant ``method-g``: ``sfnn.SparseFFN`` with ``expansion * active`` cells in blocks
  of ``g``, of which ``top_k = active // g`` blocks are computed per token, chosen by
  ``method`` (``avgk``, ``switch``, ``moe``, ``hash``, ``random``; see ``sfnn.SparseFFN``).
  Switch and MoE weigh their balancing loss by ``aux_coef``; ``sfnn.aux_loss(model)`` is the
  term the training loop adds (zero for the other methods).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sfnn

METHODS = ("dense", "avgk", "switch", "moe", "hash", "random")
# Methods with a learned router and the Switch balancing loss.
GATED = ("switch", "moe")


@dataclass(frozen=True)
class FFNSpec:
    """One FFN variant: ``method`` and, for sparse ones, ``block_size`` and ``top_k``."""

    method: str
    block_size: int | None = None  # g; None for dense
    top_k: int | None = None

    @property
    def name(self) -> str:
        return self.method if self.method == "dense" else f"{self.method}-{self.block_size}"


def default_block_size(method: str, *, active: int, block_size: int) -> int:
    """The block size of a method named without one. Switch and HashLayer send each token to
    one expert of ``active`` cells (top-1), MoE to two of ``active / 2`` (top-2); Avg-K and
    random use ``block_size``, so that those two differ only in how blocks are chosen."""
    return {"switch": active, "hash": active, "moe": active // 2}.get(method, block_size)


def parse_variant(text: str, *, active: int, block_size: int) -> FFNSpec:
    """``dense``, ``avgk``, ``avgk-16``, ``switch``, ``moe-256``, ... -> FFNSpec.

    ``method-g`` sets the block size ``g``; ``method`` alone takes
    :func:`default_block_size`. ``top_k = active // g``.
    """
    method, _, g = text.partition("-")
    if method not in METHODS:
        raise ValueError(f"unknown variant {text!r}: the method must be one of {METHODS}")
    if method == "dense":
        if g:
            raise ValueError(f"variant {text!r}: dense takes no block size")
        return FFNSpec("dense")
    try:
        g = int(g) if g else default_block_size(method, active=active, block_size=block_size)
    except ValueError:
        raise ValueError(f"variant {text!r}: the block size after '-' must be an integer") from None
    if g < 1 or active % g:
        raise ValueError(f"variant {text!r}: the block size {g} must divide the active cells "
                         f"{active} (top_k = active // block_size)")
    return FFNSpec(method, g, active // g)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    active: int  # active FFN cells per token
    expansion: int  # total cells of a sparse FFN = expansion * active
    ffn: FFNSpec
    aux_coef: float = 0.01  # the balancing-loss weight of switch and moe


class DenseFFN(nn.Module):
    """The dense baseline: ``active`` cells, all computed. Initialised like nn.Linear, as
    SparseFFN is."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def make_ffn(cfg: ModelConfig) -> nn.Module:
    spec = cfg.ffn
    if spec.method == "dense":
        return DenseFFN(cfg.d_model, cfg.active)
    gated = {"balance_loss_weight": cfg.aux_coef} if spec.method in GATED else {}
    return sfnn.SparseFFN(
        cfg.d_model, cfg.expansion * cfg.active, block_size=spec.block_size, top_k=spec.top_k,
        activation="gelu", selection=spec.method, track_usage=True,
        vocab_size=cfg.vocab_size if spec.method == "hash" else None, **gated)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # [B, H, L, Dh]
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = make_ffn(cfg)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x), token_ids=token_ids)


class GPT(nn.Module):
    """Token ids (B, L) int64 -> logits (B, L, vocab_size)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        # GPT-2's initialisation outside the FFNs (which keep nn.Linear's, like SparseFFN).
        for name, p in self.named_parameters():
            if ".ffn." in name:
                continue
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, L = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(L, device=idx.device))
        for block in self.blocks:
            x = block(x, idx)
        return F.linear(self.ln_f(x), self.tok_emb.weight)

    def sparse_ffns(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, sfnn.SparseFFN)]


def fwd_flops_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Forward matmul FLOPs per token (2 per multiply-add), causal attention averaged over the
    ``seq_len`` positions; training costs about 3x. ``ffn`` counts the computed cells and the
    selection's scoring (Avg-K's mean-key scores, the router's logits; none for hash/random)."""
    d, L, spec = cfg.d_model, cfg.seq_len, cfg.ffn
    attn = 8 * d * d + 2 * d * (L + 1)  # qkv + out projections; q.k and p.v over (L+1)/2 keys
    ffn = 4 * d * cfg.active
    if spec.method in ("avgk", "switch", "moe"):
        ffn += 2 * d * (cfg.expansion * cfg.active // spec.block_size)
    head = 2 * d * cfg.vocab_size
    return {"ffn": ffn, "total": cfg.n_layers * (attn + ffn) + head}

