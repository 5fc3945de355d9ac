"""Providers: the ways a case is computed, in one registry.

A provider turns a :class:`Problem` (the case's tensors) into ``x -> y`` and the tensors whose
``.grad`` is reset between timed calls. To add one (a selection method, a gated baseline, a
condition such as CPU contention), write its build function and :func:`register` a
:class:`Provider` at the bottom of this file; cases name providers by ``Provider.name``, the
report styles their plot line with ``Provider.style``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from .cases import ELEMENT_SIZE, Case
from .measure import sync

# Relative-norm error of a provider's forward output against the reference above which the
# row is flagged: selection near-ties may flip in low precision, so 16-bit bounds are loose.
CHECK_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
GATHER_MAX_BYTES = 512 * 2**20


class GatedMLP(nn.Module):
    """The dense gated FFN, ``down(act(gate(x)) * up(x))`` (LLaMA's MLP with silu): the
    baseline of gated cases."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class Problem:
    """The tensors of one case: a dense FFN (fc1, fc2) and the same weights in sfnn's layout.
    A gated case adds ``gate_proj`` (fc1 is then the up projection) and ``dense`` is the dense
    gated FFN."""

    def __init__(self, case: Case, device: str, seed: int = 0):
        torch.manual_seed(seed)
        dt = getattr(torch, case.dtype)
        d, d_ff = case.d_model, case.d_ff
        self.case, self.device = case, device
        self.fc1 = nn.Linear(d, d_ff, device=device, dtype=dt)
        self.fc2 = nn.Linear(d_ff, d, device=device, dtype=dt)
        act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[case.activation]
        self.dense = nn.Sequential(self.fc1, act, self.fc2)
        self.gate_keys = self.gate_bias = None
        if case.gated:
            self.gate_proj = nn.Linear(d, d_ff, device=device, dtype=dt)
            self.dense = GatedMLP(self.gate_proj, self.fc1, self.fc2, act)
            self.gate_keys = self.gate_proj.weight.detach().clone()
            self.gate_bias = self.gate_proj.bias.detach().clone()
        self.keys = self.fc1.weight.detach().clone()
        self.key_bias = self.fc1.bias.detach().clone()
        self.values = self.fc2.weight.detach().t().contiguous()
        self.out_bias = self.fc2.bias.detach().clone()
        self.x = torch.randn(case.tokens, d, device=device, dtype=dt)
        self.dy = torch.randn(case.tokens, d, device=device, dtype=dt)
        from sfnn.reference import block_means_ref, select_blocks_ref

        scored = (self.gate_keys, self.gate_bias) if case.gated else (self.keys, self.key_bias)
        self.kbar, self.bbar = block_means_ref(*scored, case.block_size)
        self.indices = select_blocks_ref(self.x, self.kbar, self.bbar, case.top_k)
        self.distinct_blocks = int(torch.unique(self.indices).numel())
        training = case.mode != "decode"
        for p in self.sparse_params():
            p.requires_grad_(training)
        for p in self.dense.parameters():
            p.requires_grad_(training)

    def gated_kwargs(self) -> dict:
        """``gate_keys=``/``gate_bias=`` for sfnn's calls (empty for a plain case)."""
        return {"gate_keys": self.gate_keys, "gate_bias": self.gate_bias} if self.case.gated \
            else {}

    def sparse_params(self) -> list:
        gate = [self.gate_keys, self.gate_bias] if self.case.gated else []
        return [self.x, self.keys, self.values, self.key_bias, self.out_bias] + gate

    def dense_params(self) -> list:
        return [self.x, *self.dense.parameters()]


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way to compute a case.

    build: ``Problem -> (x -> y, tensors whose .grad to reset)``; may raise to skip a case (the
    sweep notes why). unavailable: ``device -> None`` when the provider can run on that device,
    else a sentence saying why not (the sweep prints it once and skips the provider).
    runs_on: ``Case -> bool``, False to leave the provider out of a case silently (e.g. a
    forward-only backend outside decode). dense_flops: its nominal FLOPs are the dense FFN's
    (``provider_tflops``), not the sparse floor's. checked: its forward output is compared with
    the reference. style: matplotlib line style and marker of its plot lines. doc: one line for
    the README.
    """

    name: str
    build: Callable
    doc: str
    unavailable: Callable = lambda device: None
    runs_on: Callable = lambda case: True
    dense_flops: bool = False
    checked: bool = True
    style: dict = dataclasses.field(default_factory=lambda: {"ls": "-", "marker": "o"})


PROVIDERS: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    """Add ``provider`` to :data:`PROVIDERS` (a name may be registered once)."""
    if provider.name in PROVIDERS:
        raise ValueError(f"provider {provider.name!r} is already registered")
    PROVIDERS[provider.name] = provider
    return provider


def _dense(pb: Problem) -> tuple:
    return pb.dense, pb.dense_params()


def _naive(pb: Problem) -> tuple:
    from sfnn.reference import sparse_ffn_ref

    c = pb.case

    def naive(x):
        return sparse_ffn_ref(x, pb.keys, pb.values, block_size=c.block_size, top_k=c.top_k,
                              key_bias=pb.key_bias, out_bias=pb.out_bias,
                              activation=c.activation, **pb.gated_kwargs())

    return naive, pb.sparse_params()


def _gather(pb: Problem) -> tuple:
    c = pb.case
    need = 2 * c.tokens * c.top_k * c.block_size * c.d_model * ELEMENT_SIZE[c.dtype]
    if need > GATHER_MAX_BYTES:
        raise MemoryError(f"gathered weights would take {need / 2**20:.0f} MiB")
    if c.gated:
        raise NotImplementedError("the gather baseline computes plain FFNs only")
    from sfnn._activations import apply_activation
    from sfnn.reference import select_blocks_ref

    offsets = torch.arange(c.block_size, device=pb.device)

    def gather(x):
        idx = select_blocks_ref(x, pb.kbar, pb.bbar, c.top_k).long()
        cells = (idx[:, :, None] * c.block_size + offsets).reshape(x.shape[0], -1)
        a = torch.bmm(pb.keys[cells], x[:, :, None]).squeeze(-1) + pb.key_bias[cells]
        h = apply_activation(a, c.activation)
        return torch.bmm(h[:, None, :], pb.values[cells]).squeeze(1) + pb.out_bias

    return gather, pb.sparse_params()


def sfnn_build(pb: Problem, **options) -> tuple:
    """``sfnn.sparse_ffn`` on the problem with extra keyword ``options`` (e.g. ``backend=``).

    sfnn recomputes the block means on every training call; decoding keeps them in a
    ``BlockMeansCache``, as ``SparseFFN`` does in eval mode.
    """
    import sfnn

    c = pb.case
    if c.mode == "decode":
        options = {**options, "means_cache": sfnn.BlockMeansCache()}

    def sparse(x):
        return sfnn.sparse_ffn(x, pb.keys, pb.values, block_size=c.block_size, top_k=c.top_k,
                               key_bias=pb.key_bias, out_bias=pb.out_bias,
                               activation=c.activation, **pb.gated_kwargs(), **options)

    return sparse, pb.sparse_params()


def sfnn_unavailable(backend: str, device: str) -> str | None:
    """None when ``sfnn.sparse_ffn(..., backend=backend)`` can run on ``device``, else why not."""
    try:
        import sfnn
        from sfnn import ops
    except Exception as err:  # noqa: BLE001
        return f"sfnn import failed: {err}"
    if not hasattr(sfnn, "sparse_ffn"):
        return "sfnn.sparse_ffn does not exist"
    try:
        reason = ops.backend_unavailable_reason(backend, torch.device(device))
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    if backend == "triton" and device == "cpu" and reason is None:  # TRITON_INTERPRET=1
        reason = "on the CPU only Triton's interpreter runs, which is no benchmark"
    return reason


def _sfnn_backend(backend: str, **fields) -> Provider:
    return Provider(name=backend, build=lambda pb: sfnn_build(pb, backend=backend),
                    unavailable=lambda device: sfnn_unavailable(backend, device), **fields)


register(Provider("dense", _dense, dense_flops=True, checked=False,
                  doc="`nn.Sequential(nn.Linear(d, d_ff), act, nn.Linear(d_ff, d))`: the "
                      "baseline"))
register(Provider("naive", _naive, dense_flops=True, style={"ls": ":", "marker": "s"},
                  doc="`sfnn.reference.sparse_ffn_ref`: the dense-masked oracle (what a user "
                      "writes first)"))
register(Provider("gather", _gather, style={"ls": "-.", "marker": "^"},
                  doc="per-token gathered weight rows and two batched mat-vecs; only where the "
                      "copies fit in 512 MiB (decoding)"))
register(_sfnn_backend("torch", style={"ls": "-", "marker": "o"},
                       doc='`sfnn.sparse_ffn(..., backend="torch")`'))
def _torch_nokernel(pb: Problem) -> tuple:
    """``backend="torch"`` with the CPU kernel turned off for the call: the pure-PyTorch path
    (the few-token path for short decodes), what users without a C++ compiler get."""
    from sfnn import torch_path

    f, params = sfnn_build(pb, backend="torch")

    def nokernel(x):
        saved = torch_path._cpu_kernel
        torch_path._cpu_kernel = lambda t: None
        try:
            return f(x)
        finally:
            torch_path._cpu_kernel = saved

    return nokernel, params


register(Provider("torch-nokernel", _torch_nokernel,
                  unavailable=lambda device: ("the CPU kernel is CPU-only" if device != "cpu"
                                              else sfnn_unavailable("torch", device)),
                  style={"ls": ":", "marker": "x"},
                  doc='`backend="torch"` with the CPU kernel off (`SFNN_CPU_KERNEL=0`): the '
                      "pure-PyTorch path"))
register(_sfnn_backend("triton", style={"ls": "-", "marker": "D"},
                       doc='`backend="triton"`, CUDA tensors only'))
register(_sfnn_backend("cuda", runs_on=lambda case: case.mode == "decode",
                       style={"ls": "--", "marker": "v"},
                       doc='`backend="cuda"` when `sfnn.cuda_ext.available()`; forward-only, so '
                           "decode only"))


def selection_build(pb: Problem, method: str) -> tuple:
    """``sfnn.sparse_ffn(..., selection=method)`` (backend "auto") on the problem's weights: a
    Switch-initialised router (switch, moe; its balancing loss is added in training modes), a
    50,257-id balanced hash table and random token ids (hash), a fixed seed (random). Its output
    differs from Avg-K's, so the row is not checked against the Avg-K reference."""
    import math

    import sfnn

    c = pb.case
    training = c.mode != "decode"
    kw = {"selection": method}
    params = pb.sparse_params()
    if method in ("switch", "moe"):
        std = math.sqrt(0.1 / c.d_model)
        gen = torch.Generator().manual_seed(5)
        router = (torch.randn(c.n_blocks, c.d_model, generator=gen) * std).to(
            device=pb.device, dtype=pb.x.dtype).requires_grad_(training)
        kw["router_weight"] = router
        params = params + [router]
    if method == "hash":
        gen = torch.Generator().manual_seed(6)
        kw["hash_table"] = sfnn.balanced_hash_table(50257, c.n_blocks, c.top_k).to(pb.device)
        kw["token_ids"] = torch.randint(0, 50257, (c.tokens,), generator=gen).to(pb.device)
    if method == "random":
        kw["seed"] = 7
    if c.mode == "decode" and method == "avgk":
        kw["means_cache"] = sfnn.BlockMeansCache()

    def sparse(x):
        y, sel = sfnn.sparse_ffn(x, pb.keys, pb.values, block_size=c.block_size, top_k=c.top_k,
                                 key_bias=pb.key_bias, out_bias=pb.out_bias,
                                 activation=c.activation, return_selection=True,
                                 **pb.gated_kwargs(), **kw)
        if training and sel.gates is not None:
            return y + 0 * sel.aux_loss  # the balancing loss's backward is timed too
        return y

    return sparse, params


def _selection(method: str, marker: str) -> Provider:
    return Provider(name=method, build=lambda pb: selection_build(pb, method), checked=False,
                    unavailable=lambda device: sfnn_unavailable("torch", device),
                    style={"ls": "--", "marker": marker},
                    doc=f'`sfnn.sparse_ffn(..., selection="{method}")` (backend "auto"): the '
                        f"selection cost of the paper's {method} method beside Avg-K's; not "
                        "checked (its output is not Avg-K's)")


register(_selection("switch", "P"))
register(_selection("moe", "X"))
register(_selection("hash", "*"))
register(_selection("random", "h"))


def provider_reasons(device: str) -> dict:
    """Provider name -> None when it can run on ``device``, else the reason it cannot."""
    return {name: p.unavailable(device) for name, p in PROVIDERS.items()}


def make_runner(provider: str, pb: Problem) -> tuple:
    """(the timed zero-argument callable for the case's mode, forward output for checking)."""
    f, params = PROVIDERS[provider].build(pb)
    x, dy, device = pb.x, pb.dy, pb.device

    def clear():
        for p in params:
            p.grad = None

    mode = pb.case.mode
    if mode == "decode":
        with torch.no_grad():
            y0 = f(x)

        def run():
            with torch.no_grad():
                f(x)

    elif mode == "forward":
        y0 = f(x)

        def run():
            f(x)

    elif mode == "backward":
        y0 = f(x)
        y0.backward(dy, retain_graph=True)  # a first backward proves it works

        def run():
            clear()
            y0.backward(dy, retain_graph=True)

    else:
        y0 = f(x)
        y0.backward(dy)

        def run():
            clear()
            f(x).backward(dy)

    clear()
    sync(device)
    return run, y0.detach()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))

