"""Convert the dense FFNs of pretrained Hugging Face models into Avg-K sparse FFNs.

``sfnn.convert(model, block_size=32, density=0.5, calibration=batches)`` finds every feed-forward
block of a model by module type, swaps it for a :class:`ConvertedFFN` holding the same weights,
optionally permutes each layer's cells into balanced clusters of similar keys, and optionally
calibrates the converted layers on a few hundred inputs. Everything around the FFN (dropout, the
residual, LayerNorm, the model's config and ``generate``) is left as it was.

Supported (detected by class, see :data:`ADAPTERS`):

- BERT family: a module whose ``intermediate`` is ``BertIntermediate`` (``dense`` + activation)
  and whose ``output`` is ``BertOutput`` (``dense``, dropout, LayerNorm with the residual); also
  the RoBERTa, XLM-RoBERTa, CamemBERT and ELECTRA copies. MiniLM checkpoints are ``BertModel``.
  ``intermediate.dense`` becomes the whole sparse FFN, the activation and ``output.dense``
  become ``nn.Identity``; the dropout and LayerNorm of ``BertOutput`` still run.
- GPT-2: ``GPT2MLP`` (``Conv1D`` weights stored ``(in, out)``): ``c_fc`` becomes the sparse FFN
  (``key_weight = c_fc.weight.T``, ``value_weight = c_proj.weight``), ``act`` and ``c_proj``
  become ``nn.Identity``; the MLP's dropout still runs. GPT-2 checkpoints use the tanh
  approximation of GELU (``gelu_new``), which sfnn's kernels do not compute: pass
  ``activation="gelu"`` to accept exact GELU in its place (it differs by at most 2e-4 per cell).
- LLaMA family: the gated MLPs ``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``
  (``down_proj(act(gate_proj(x)) * up_proj(x))``) are replaced whole by a gated
  :class:`ConvertedFFN` (``gate_weight = gate_proj.weight``, ``key_weight = up_proj.weight``,
  ``value_weight = down_proj.weight.T``). Avg-K scores the gate table's block means, and
  clustering groups cells by their gate keys.

Calibration (:class:`Calibration`) offers, each measured in ``bench/convert.py``:

(a) ``scores``: a calibrated scoring table ``(score_weight (n_blocks, d_model), score_bias
    (n_blocks,))`` that replaces the mean keys in the same ``select_blocks`` call (so it runs in
    the same fused kernel). It is a ridge regression of each block's true weight (the norm of
    its contribution: the output error of dropping it alone), normalised per token, on the
    layer's inputs, shrunk towards a scaled copy of the mean keys.
(b) ``compensation``: per block, the expected contribution of its cells *when the block is
    dropped*, with winsorised activations; per token the layer adds ``comp.sum(0) -
    comp[selected].sum(0)`` (top_k extra row reads). A mean over all tokens (the naive
    estimate) is dominated by the few tokens with huge activations (special tokens), which are
    exactly the tokens that select those blocks, so it adds back mass that was never missing.
(c) ``distill_steps``: Adam on the converted layers' weights (and compensation tables) against
    the dense model's hidden states at every layer, on the calibration inputs.
(d) ``allocate``: spread the density budget over layers by their measured sensitivity (the
    final hidden state's error with that layer alone sparse, at a few densities).

The oracle (``ConvertedFFN.selection = "oracle"``) chooses, per token, the top_k blocks of
largest true weight, computed densely: the bound on what any scoring table (a) can reach.

Saving and loading: a converted model's ``state_dict()`` (and ``save_pretrained``) holds the
permuted weights, the fitted tables and each layer's ``block_size``/``top_k`` (as the
``_extra_state`` tensor of each :class:`ConvertedFFN`). :func:`restore` rebuilds the converted
structure on a freshly built dense model of the same config and loads such a state dict.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._activations import ACTIVATIONS, apply_activation
from .functional import block_ffn, block_means, select_blocks
from .module import SparseFFN

Tensor = torch.Tensor

__all__ = ["convert", "restore", "Calibration", "ConversionReport", "ConvertedFFN",
           "cluster_cells", "find_ffns", "ADAPTERS"]


# --------------------------------------------------------------------------- the layer
class ConvertedFFN(SparseFFN):
    """A :class:`~sfnn.SparseFFN` made from a pretrained dense FFN, with the optional tables that
    calibration fits. Without tables its forward is exactly ``SparseFFN.forward``.

    Buffers, None until fitted (then saved in the state dict and restored on load):
        score_weight: (n_blocks, d_model) float32 and score_bias: (n_blocks,) float32: a
            scoring table used in place of the mean keys ``kbar``/``bbar`` by the same
            :func:`~sfnn.select_blocks` call.
        comp: (n_blocks, d_model) float32: per block, the expected contribution of its cells
            when the block is not selected; the output gains ``comp.sum(0) -
            comp[indices].sum(1)``. Skipped at ``top_k == n_blocks``.

    Attributes:
        selection: "avgk" (default: the scoring table if fitted, else the mean keys) or
            "oracle" (per token, the top_k blocks of largest true weight, computed densely: an
            analysis tool, it costs a dense FFN and more).
        dense: when True, the layer computes the dense FFN (all cells, no tables): the
            reference during calibration.

    Shapes: input (..., d_model) -> output (..., d_model).
    """

    def __init__(self, d_model: int, d_ff: int, **kwargs):
        super().__init__(d_model, d_ff, **kwargs)
        self.register_buffer("score_weight", None)
        self.register_buffer("score_bias", None)
        self.register_buffer("comp", None)
        self.selection = "avgk"
        self.dense = False
        self._register_load_state_dict_pre_hook(_make_table_buffers, with_module=True)

    @classmethod
    def from_weights(cls, keys: Tensor, values: Tensor, key_bias: Tensor | None,
                     out_bias: Tensor | None, *, block_size: int, top_k: int, activation: str,
                     gate_keys: Tensor | None = None, gate_bias: Tensor | None = None,
                     **kwargs) -> ConvertedFFN:
        """Copies of the dense tables: keys (d_ff, d_model) = ``fc1.weight`` (``up_proj.weight``
        of a gated MLP), values (d_ff, d_model) = ``fc2.weight.T``, key_bias (d_ff,) or None,
        out_bias (d_model,) or None; gate_keys (d_ff, d_model) = ``gate_proj.weight`` and
        gate_bias (d_ff,) or None make a gated layer."""
        d_ff, d_model = keys.shape
        ffn = cls(d_model, d_ff, block_size=block_size, top_k=top_k, activation=activation,
                  bias=True, gated=gate_keys is not None, device=keys.device, dtype=keys.dtype,
                  **kwargs)
        with torch.no_grad():
            for name, src in zip(_TABLE_NAMES, (keys, values, key_bias, out_bias, gate_keys,
                                                gate_bias), strict=True):
                if src is None:
                    setattr(ffn, name, None)
                else:
                    getattr(ffn, name).copy_(src)
        return ffn

    # ---- tables
    def set_scores(self, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Install a scoring table (n_blocks, d_model) and (n_blocks,), or remove it (None)."""
        if weight is None:
            self.score_weight = self.score_bias = None
            return
        if tuple(weight.shape) != (self.n_blocks, self.d_model):
            raise ValueError(f"score weight must be (n_blocks, d_model) = ({self.n_blocks}, "
                             f"{self.d_model}), got {tuple(weight.shape)}")
        if bias is None:
            bias = torch.zeros(self.n_blocks)
        if tuple(bias.shape) != (self.n_blocks,):
            raise ValueError(f"score bias must be ({self.n_blocks},), got {tuple(bias.shape)}")
        dev = self.key_weight.device
        self.score_weight = weight.detach().float().to(dev).contiguous()
        self.score_bias = bias.detach().float().to(dev).contiguous()

    def set_compensation(self, table: Tensor | None) -> None:
        """Install a dropped-block compensation table (n_blocks, d_model), or remove it."""
        if table is None:
            self.comp = None
            return
        if tuple(table.shape) != (self.n_blocks, self.d_model):
            raise ValueError(f"compensation must be (n_blocks, d_model) = ({self.n_blocks}, "
                             f"{self.d_model}), got {tuple(table.shape)}")
        self.comp = table.detach().float().to(self.key_weight.device).contiguous()

    # ---- save / load of the per-layer configuration
    def get_extra_state(self) -> Tensor:
        return torch.tensor([self.block_size, self.top_k], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        block_size, top_k = (int(v) for v in torch.as_tensor(state).tolist())
        if block_size != self.block_size:
            raise ValueError(f"checkpoint has block_size={block_size}, this layer "
                             f"{self.block_size}: convert with the same block_size (or use "
                             f"sfnn.conversion.restore)")
        if not 1 <= top_k <= self.n_blocks:
            raise ValueError(f"checkpoint top_k={top_k} is outside [1, {self.n_blocks}]")
        self.top_k = top_k

    # ---- forward
    def select(self, x2d: Tensor) -> Tensor:
        """This layer's choice of blocks for tokens x2d (T, d_model): (T, top_k) int32."""
        if self.selection == "oracle":
            return _oracle_indices(self, x2d)
        if self.score_weight is not None:
            return select_blocks(x2d, self.score_weight, self.score_bias, self.top_k)
        table, bias = _scored_table(self)
        kbar, bbar = block_means(table, bias, block_size=self.block_size,
                                 means_cache=self._serving_cache())
        return select_blocks(x2d, kbar, bbar, self.top_k)

    def forward(self, x: Tensor) -> Tensor:
        if self.dense:
            return _dense_ffn(self, x)
        if self.selection == "avgk" and self.score_weight is None and self.comp is None:
            return super().forward(x)
        x2d = x.reshape(-1, self.d_model)
        idx = self.select(x2d)
        y = block_ffn(x2d, self.key_weight, self.value_weight, idx, block_size=self.block_size,
                      key_bias=self.key_bias, out_bias=self.out_bias, activation=self.activation,
                      backend=self.backend, deterministic=self.deterministic,
                      gate_keys=self.gate_weight, gate_bias=self.gate_bias)
        if self.comp is not None and self.top_k < self.n_blocks:
            kept = F.embedding_bag(idx.long(), self.comp, mode="sum")  # [T, d]: top_k rows
            y = y + (self.comp.sum(0) - kept).to(y.dtype)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        tables = [n for n in ("score_weight", "comp") if getattr(self, n) is not None]
        return super().extra_repr() + f", tables={tables}"


def _make_table_buffers(module, state_dict, prefix, *args) -> None:
    """Loading a calibrated layer's state dict into an uncalibrated one creates the tables."""
    for name in ("score_weight", "score_bias", "comp"):
        src = state_dict.get(prefix + name)
        if src is not None and getattr(module, name) is None:
            setattr(module, name, torch.empty(src.shape, dtype=torch.float32,
                                              device=module.key_weight.device))


# A layer's tables, in the order from_weights takes them (gate_* are None unless gated).
_TABLE_NAMES = ("key_weight", "value_weight", "key_bias", "out_bias", "gate_weight", "gate_bias")


def _tables_of(ffn: SparseFFN) -> tuple[Tensor | None, ...]:
    return tuple(getattr(ffn, name) for name in _TABLE_NAMES)


def _scored_table(ffn: SparseFFN) -> tuple[Tensor, Tensor | None]:
    """The table whose block means Avg-K scores: the gate keys of a gated layer, else the
    keys (with its bias)."""
    return (ffn.gate_weight, ffn.gate_bias) if ffn.gated else (ffn.key_weight, ffn.key_bias)


def _acts(x: Tensor, keys: Tensor, key_bias, gate_keys, gate_bias, activation: str) -> Tensor:
    """Every cell's activation (T, d_ff): ``act(x K^T + b)``, or ``act(x G^T + b_g) * (x K^T +
    b)`` for a gated layer."""
    if gate_keys is None:
        return apply_activation(F.linear(x, keys, key_bias), activation)
    return apply_activation(F.linear(x, gate_keys, gate_bias), activation) * F.linear(
        x, keys, key_bias)


def _dense_ffn(ffn: SparseFFN, x: Tensor) -> Tensor:
    """The dense FFN of ``ffn``'s tables, or of the frozen copy kept while distilling."""
    keys, values, kb, ob, gk, gb = getattr(ffn, "_teacher", None) or _tables_of(ffn)
    y = _acts(x, keys, kb, gk, gb, ffn.activation) @ values
    return y if ob is None else y + ob


# --------------------------------------------------------------------------- block statistics
def _cell_acts(ffn: SparseFFN, x2d: Tensor) -> Tensor:
    """The activation of every cell (:func:`_acts`), float32: (T, d_ff)."""
    keys, _, kb, _, gk, gb = (None if t is None else t.detach().float() for t in _tables_of(ffn))
    return _acts(x2d.float(), keys, kb, gk, gb, ffn.activation)


def _block_weight(ffn: SparseFFN, h: Tensor, comp: Tensor | None) -> Tensor:
    """(T, n_blocks): each block's true weight for each token, ``||c_b - m_b||`` with ``c_b``
    the block's exact contribution ``sum_{i in b} h_i v_i`` and ``m_b`` its compensation (0
    without): the output error of dropping that block alone. Keeping the blocks of largest
    weight is the oracle; on all-MiniLM-L6-v2 it beat ranking by ``||e||^2 - ||e - c_b||^2``
    (the gain of keeping a block alone) at every density, and came within about 2x of greedy
    forward selection's error at density 1/2. h: (T, d_ff) cell activations.
    """
    t = h.shape[0]
    nb, g = ffn.n_blocks, ffn.block_size
    vb = ffn.value_weight.detach().float().view(nb, g, -1)
    hb = h.view(t, nb, g).transpose(0, 1)  # [nb, T, g]
    gram = torch.bmm(vb, vb.transpose(1, 2))  # [nb, g, g]
    sq = (torch.bmm(hb, gram) * hb).sum(-1)  # [nb, T]: ||c_b||^2
    if comp is not None:
        u = (vb * comp[:, None, :]).sum(-1)  # [nb, g]: v_i . m_b(i)
        sq = sq - 2 * (hb * u[:, None, :]).sum(-1) + (comp * comp).sum(-1)[:, None]
    return sq.clamp_min(0).sqrt().t()


def _oracle_indices(ffn: SparseFFN, x2d: Tensor) -> Tensor:
    h = _cell_acts(ffn, x2d.detach())
    comp = getattr(ffn, "comp", None)
    weight = _block_weight(ffn, h, comp)
    order = torch.sort(weight, dim=-1, descending=True, stable=True).indices
    return order[:, :ffn.top_k].to(torch.int32)


def _chunks(x: Tensor, size: int = 2048):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


# --------------------------------------------------------------------------- clustering
def cluster_cells(keys: Tensor, block_size: int, *, seed: int = 0, iters: int = 25,
                  dim: int = 512) -> Tensor:
    """Balanced spherical k-means of the cells' normalised keys into blocks of equal size.

    Args:
        keys: (d_ff, d_model) (``fc1.weight``). block_size: cells per cluster (divides d_ff).
        seed: the initial centroids (a seeded random choice of cells). iters: Lloyd rounds at
            most (stops when no cell moves). dim: keys wider than this are first projected on
            the top ``dim`` principal directions of a sample of 2048 of them (seeded
            randomised PCA), which keeps the work to seconds per layer at d_ff = 16k.

    Returns:
        perm: (d_ff,) int64, a permutation of the cells; ``keys[perm]`` holds cluster ``b`` in
        rows ``[b*g, (b+1)*g)``. Deterministic for a given seed, input and thread count.
    """
    d_ff, d_model = keys.shape
    if d_ff % block_size:
        raise ValueError(f"block_size={block_size} must divide d_ff={d_ff}")
    nb = d_ff // block_size
    z = F.normalize(keys.detach().float().cpu(), dim=1)  # on the CPU: seeded, repeatable
    if nb == 1:
        return torch.arange(d_ff)
    gen = torch.Generator().manual_seed(seed)
    if d_model > dim:  # principal directions of a sample of 2048 cells, then project them all
        sample = z[torch.randperm(d_ff, generator=gen)[:2048]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, basis = torch.pca_lowrank(sample, q=dim, center=True, niter=2)
        z = F.normalize(z @ basis, dim=1)
    centroids = z[torch.randperm(d_ff, generator=gen)[:nb]]
    assign = None
    for _ in range(iters):
        new = _balanced_assign(z @ centroids.t(), block_size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, z), dim=1)
    return torch.sort(assign, stable=True).indices


def _balanced_assign(sim: Tensor, cap: int) -> Tensor:
    """Assign n = k * cap items to k clusters of exactly ``cap`` each, by rounds of proposals:
    every unassigned item proposes to its most similar cluster that still has room; each cluster
    keeps its most similar proposers up to its room. sim: (n, k). Returns (n,) int64."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.int64)
    load = torch.zeros(k, dtype=torch.int64)
    free = torch.arange(n)
    while free.numel():
        s = sim[free]
        s[:, load >= cap] = -math.inf
        val, choice = s.max(1)
        o1 = torch.argsort(val, descending=True, stable=True)
        order = o1[torch.argsort(choice[o1], stable=True)]
        ch = choice[order]
        counts = torch.bincount(ch, minlength=k)
        rank = torch.arange(ch.numel()) - (torch.cumsum(counts, 0) - counts)[ch]
        accept = rank < (cap - load)[ch]
        assign[free[order[accept]]] = ch[accept]
        load += torch.bincount(ch[accept], minlength=k)
        free = free[order[~accept]]
    return assign


# --------------------------------------------------------------------------- architectures
@dataclasses.dataclass
class _Site:
    """One FFN found in a model: ``owner`` (the module holding it) under ``name``."""

    name: str
    owner: nn.Module
    adapter: _Adapter
    parent: nn.Module | None = None  # the module holding ``owner`` (None for the root)

    @property
    def ffn_name(self) -> str:
        return ".".join(p for p in (self.name, self.adapter.ffn_path) if p)


class _Tables(NamedTuple):
    """A dense FFN's tables as sfnn lays them out (row per cell): keys (d_ff, d_model) (the up
    table of a gated MLP), values (d_ff, d_model), key_bias (d_ff,) | None, out_bias (d_model,)
    | None, the activation module, and for gated MLPs gate_keys (d_ff, d_model) and gate_bias
    (d_ff,) | None."""

    keys: Tensor
    values: Tensor
    key_bias: Tensor | None
    out_bias: Tensor | None
    act: nn.Module
    gate_keys: Tensor | None = None
    gate_bias: Tensor | None = None


class _Adapter:
    """How one architecture family stores its FFN. Subclasses name the classes they recognise
    (``types``: (transformers module, class name) pairs, resolved lazily) and know how to read
    the dense tables and install the sparse layer."""

    kind = ""
    types: tuple[tuple[str, str], ...] = ()
    ffn_path = ""  # where the ConvertedFFN lives inside the owner once installed

    def classes(self) -> tuple[type, ...]:
        return _resolve(self.types)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes())

    def tables(self, owner: nn.Module) -> _Tables:
        raise NotImplementedError

    def install(self, site: _Site, ffn: ConvertedFFN) -> None:
        """Put ``ffn`` in the model in place of ``site``'s dense FFN."""
        raise NotImplementedError


def _resolve(pairs) -> tuple[type, ...]:
    out = []
    for mod, cls in pairs:
        try:
            out.append(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):
            continue
    return tuple(out)


_BERT_FAMILY = ("bert", "roberta", "xlm_roberta", "camembert", "electra")
_BERT_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm_roberta": "XLMRoberta",
                "camembert": "Camembert", "electra": "Electra"}


class _BertAdapter(_Adapter):
    """A layer whose ``intermediate`` is ``*Intermediate`` and ``output`` is ``*Output``."""

    kind = "bert"
    types = tuple((f"transformers.models.{m}.modeling_{m}", f"{_BERT_PREFIX[m]}Intermediate")
                  for m in _BERT_FAMILY)
    out_types = tuple((f"transformers.models.{m}.modeling_{m}", f"{_BERT_PREFIX[m]}Output")
                      for m in _BERT_FAMILY)
    ffn_path = "intermediate.dense"

    def matches(self, module):
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        return (isinstance(inter, self.classes()) and isinstance(out, _resolve(self.out_types))
                and isinstance(inter.dense, nn.Linear) and isinstance(out.dense, nn.Linear))

    def tables(self, owner):
        fc1, fc2 = owner.intermediate.dense, owner.output.dense
        return _Tables(fc1.weight, fc2.weight.t(), fc1.bias, fc2.bias,
                       owner.intermediate.intermediate_act_fn)

    def install(self, site, ffn):
        owner = site.owner
        owner.intermediate.dense = ffn
        owner.intermediate.intermediate_act_fn = nn.Identity()
        owner.output.dense = nn.Identity()


class _GPT2Adapter(_Adapter):
    """``GPT2MLP``: ``Conv1D`` stores its weight (in, out), so keys = ``c_fc.weight.T`` and
    values = ``c_proj.weight`` as it is."""

    kind = "gpt2"
    types = (("transformers.models.gpt2.modeling_gpt2", "GPT2MLP"),)
    ffn_path = "c_fc"

    def matches(self, module):
        return super().matches(module) and not isinstance(module.c_fc, ConvertedFFN)

    def tables(self, owner):
        return _Tables(owner.c_fc.weight.t(), owner.c_proj.weight, owner.c_fc.bias,
                       owner.c_proj.bias, owner.act)

    def install(self, site, ffn):
        owner = site.owner
        owner.c_fc = ffn
        owner.act = nn.Identity()
        owner.c_proj = nn.Identity()


class _GatedAdapter(_Adapter):
    """LLaMA-family ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: the gated product of two
    branches cannot be spread over the MLP's own submodules, so the gated layer replaces the
    whole MLP in its parent (it takes and returns the same (..., d_model) tensor)."""

    kind = "gated"
    types = (("transformers.models.llama.modeling_llama", "LlamaMLP"),
             ("transformers.models.mistral.modeling_mistral", "MistralMLP"),
             ("transformers.models.qwen2.modeling_qwen2", "Qwen2MLP"))

    def matches(self, module):
        return super().matches(module) and all(
            isinstance(getattr(module, n, None), nn.Linear)
            for n in ("gate_proj", "up_proj", "down_proj"))

    def tables(self, owner):
        down = owner.down_proj
        return _Tables(owner.up_proj.weight, down.weight.t(), owner.up_proj.bias, down.bias,
                       owner.act_fn, owner.gate_proj.weight, owner.gate_proj.bias)

    def install(self, site, ffn):
        if site.parent is None:
            raise ValueError("convert the model that holds the gated MLP, not the MLP itself")
        setattr(site.parent, site.name.rpartition(".")[2], ffn)


#: The architecture adapters, tried in order on every module of a model.
ADAPTERS: list[_Adapter] = [_BertAdapter(), _GPT2Adapter(), _GatedAdapter()]


def find_ffns(model: nn.Module) -> list[_Site]:
    """Every FFN of ``model`` that an adapter recognises, in module order."""
    sites = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        for adapter in ADAPTERS:
            if adapter.matches(module):
                parent = modules[name.rpartition(".")[0]] if name else None
                sites.append(_Site(name, module, adapter, parent))
                break
    return sites


def _match_activation(act: nn.Module) -> str | None:
    """Which of sfnn's activations ``act`` computes (compared on a grid), or None."""
    grid = torch.linspace(-8, 8, 2001)
    try:
        with torch.no_grad():
            got = act(grid)
    except Exception:  # noqa: BLE001 - any failure means: not a plain elementwise activation
        return None
    for name in ACTIVATIONS:
        if torch.allclose(got, apply_activation(grid, name), rtol=0, atol=1e-6):
            return name
    return None


# --------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class Calibration:
    """What to fit on the calibration inputs, and how.

    Args:
        batches: a sequence of model inputs, each a mapping passed as ``model(**batch)`` (e.g. a
            tokenizer's output with ``attention_mask``: padding tokens are left out of every
            statistic) or a tensor passed as ``model(batch)``. A few hundred sentences suffice.
        scores: (a) fit a scoring table per layer.
        compensation: (b) fit a dropped-block compensation table per layer.
        distill_steps: (c) Adam steps of distillation against the dense hidden states (0: off).
        allocate: (d) spread the density budget over layers by measured sensitivity.
        trim: winsorising quantile for the compensation's activations (each cell's activations
            are clipped to its [trim, 1 - trim] quantiles over the calibration tokens).
        ridge: the scoring table's shrinkage towards the scaled mean keys, relative to the
            inputs' mean second moment.
        lr: distillation learning rate. seed: distillation batch order.
    """

    batches: Sequence
    scores: bool = True
    compensation: bool = True
    distill_steps: int = 0
    allocate: bool = False
    trim: float = 0.01
    ridge: float = 1e-3
    lr: float = 1e-4
    seed: int = 0


@dataclasses.dataclass
class ConversionReport:
    """Per converted layer: name, kind, d_ff, block_size, top_k, density, seconds of
    clustering, and on the calibration inputs (None without calibration) the kept share of
    activation mass (``sum |act|`` over selected cells / over all cells) and the layer's relative
    output error ``||y - y_dense|| / ||y_dense - out_bias||``."""

    layers: list[dict]
    seconds: float = 0.0

    def __str__(self) -> str:
        head = ("layer", "kind", "d_ff", "g", "top_k", "density", "cluster s", "kept mass",
                "rel err")
        rows = [head]
        for r in self.layers:
            rows.append((r["name"], r["kind"], str(r["d_ff"]), str(r["block_size"]),
                         str(r["top_k"]), f"{r['density']:.3f}", f"{r['cluster_s']:.2f}",
                         _fmt(r["kept_mass"]), _fmt(r["rel_err"])))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        return "\n".join(lines + [f"total {self.seconds:.1f} s"])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _progress(it, progress: bool, **kw):
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, **kw)


def _run(model: nn.Module, batch, **kw):
    if isinstance(batch, Mapping):
        return model(**batch, **kw)
    if isinstance(batch, torch.Tensor):
        return model(batch, **kw)
    raise TypeError(f"calibration batches must be mappings (model(**batch)) or tensors "
                    f"(model(batch)), got {type(batch).__name__}")


def _mask(batch) -> Tensor | None:
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None


def _tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """(..., d) hidden states -> (T, d), padding tokens removed when the mask fits."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, ffn: ConvertedFFN, batches) -> Tensor:
    """The inputs that ``ffn`` receives over the batches, as (T, d_model) float32."""
    got, mask = [], [None]

    def hook(module, args):
        got.append(_tokens(args[0].detach(), mask[0]).float())
        raise _Stop

    handle = ffn.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            mask[0] = _mask(batch)
            try:
                _run(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(got)


def _hidden(model, batch) -> list[Tensor]:
    out = _run(model, batch, output_hidden_states=True)
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        raise ValueError("the model must return hidden_states when called with "
                         "output_hidden_states=True (Hugging Face models do)")
    return list(hs)


class _Dense:
    """Context: every converted layer computes its dense FFN (the exact original model)."""

    def __init__(self, ffns, keep=None):
        self.ffns, self.keep = ffns, keep

    def __enter__(self):
        for f in self.ffns:
            f.dense = f is not self.keep
        return self

    def __exit__(self, *exc):
        for f in self.ffns:
            f.dense = False


def fit_scores(ffn: ConvertedFFN, x: Tensor, comp: Tensor | None = None, *,
               ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(a) A scoring table for ``ffn`` fitted on its inputs x (T, d_model).

    Targets: each block's weight (:func:`_block_weight`), centred and scaled to unit variance per
    token (only the order within a token matters). Model: ``x . W_b + c_b``, ridge regression
    shrunk towards ``alpha * (kbar, bbar)`` (``alpha``: the least-squares scale of the Avg-K
    scores against the targets). Returns (n_blocks, d_model) and (n_blocks,) float32.
    """
    nb, d = ffn.n_blocks, ffn.d_model
    table, table_bias = _scored_table(ffn)
    kbar, bbar = block_means(table.detach(), _det(table_bias), block_size=ffn.block_size)
    dev = x.device
    bias = torch.zeros(nb, device=dev) if bbar is None else bbar.float().to(dev)
    prior = torch.cat([kbar.float().to(dev), bias[:, None]], 1).double()  # [nb, d+1]
    ata = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=dev)
    atz = torch.zeros(d + 1, nb, dtype=torch.float64, device=dev)
    num = den = 0.0
    for xc in _chunks(x):
        z = _block_weight(ffn, _cell_acts(ffn, xc), comp)
        z = z - z.mean(1, keepdim=True)
        z = (z / z.std(1, keepdim=True).clamp_min(1e-12)).double()
        a = torch.cat([xc.double(), torch.ones(xc.shape[0], 1, dtype=torch.float64, device=dev)],
                      1)
        ata += a.t() @ a
        atz += a.t() @ z
        s0 = a @ prior.t()
        s0 = s0 - s0.mean(1, keepdim=True)
        num += float((s0 * z).sum())
        den += float((s0 * s0).sum())
    alpha = max(num / den, 0.0) if den > 0 else 0.0
    lam = ridge * float(torch.diagonal(ata).mean())
    w = torch.linalg.solve(ata + lam * torch.eye(d + 1, dtype=torch.float64, device=dev),
                           atz + lam * alpha * prior.t())  # [d+1, nb]
    return w[:d].t().float().contiguous(), w[d].float().contiguous()


def fit_compensation(ffn: ConvertedFFN, x: Tensor, *, trim: float = 0.01,
                     conditional: bool = True) -> Tensor:
    """(b) Per block, the expected contribution of its cells when it is dropped: (n_blocks,
    d_model) float32, ``sum_{i in b} mean(h_i) v_i``.

    ``conditional``: the mean over the tokens whose selection (the layer's current one) drops
    the block, not over all tokens. ``trim``: each cell's activations clipped to its
    [trim, 1 - trim] quantiles over (up to 8192 of) the tokens first. ``conditional=False,
    trim=0`` is the naive estimate.
    """
    nb, g = ffn.n_blocks, ffn.block_size
    lo = hi = None
    if trim > 0:
        sub = x[torch.linspace(0, x.shape[0] - 1, min(x.shape[0], 8192)).long().to(x.device)]
        hs = torch.sort(_cell_acts(ffn, sub), 0).values
        n = hs.shape[0]
        lo, hi = hs[int(trim * (n - 1))], hs[int(math.ceil((1 - trim) * (n - 1)))]
    sums = torch.zeros(ffn.d_ff, device=x.device)
    counts = torch.zeros(nb, device=x.device)
    for xc in _chunks(x):
        h = _cell_acts(ffn, xc)
        if lo is not None:
            h = torch.minimum(torch.maximum(h, lo), hi)
        if conditional:
            with torch.no_grad():
                idx = ffn.select(xc.to(ffn.key_weight.dtype)).long()
            drop = torch.ones(xc.shape[0], nb, device=x.device).scatter_(1, idx, 0.0)
        else:
            drop = torch.ones(xc.shape[0], nb, device=x.device)
        sums += (h.view(-1, nb, g) * drop[:, :, None]).sum(0).reshape(-1)
        counts += drop.sum(0)
    mean = sums.view(nb, g) / counts.clamp_min(1)[:, None]
    v = ffn.value_weight.detach().float().view(nb, g, -1)
    return (mean[:, :, None] * v).sum(1)


def _det(t):
    return None if t is None else t.detach()


@torch.no_grad()
def _sensitivity(model, ffns, batches, fractions) -> list[list[float]]:
    """err[l][j]: relative squared error of the final hidden state with only layer l sparse at
    density fractions[j] (mean-key selection), on the batches."""
    refs = []
    with _Dense(ffns):
        for b in batches:
            refs.append(_tokens(_hidden(model, b)[-1], _mask(b)).float())
    ref_energy = sum(float((r * r).sum()) for r in refs)
    errs = []
    for f in ffns:
        row, top_k = [], f.top_k
        for frac in fractions:
            f.top_k = max(1, min(f.n_blocks, round(frac * f.n_blocks)))
            err = 0.0
            with _Dense(ffns, keep=f):
                for b, r in zip(batches, refs, strict=True):
                    h = _tokens(_hidden(model, b)[-1], _mask(b)).float()
                    err += float(((h - r) ** 2).sum())
            row.append(err / ref_energy)
        f.top_k = top_k
        errs.append(row)
    return errs


def _allocate(ffns, errs, fractions, budget_cells: int) -> list[int]:
    """Greedy: start every layer at the smallest fraction, then give one block at a time to the
    layer whose interpolated error falls most per cell, up to the largest fraction, until the
    cell budget is spent."""
    def err_at(i, k):
        f = ffns[i]
        pts = [(max(1, min(f.n_blocks, round(fr * f.n_blocks))), e)
               for fr, e in zip(fractions, errs[i], strict=True)] + [(f.n_blocks, 0.0)]
        pts = sorted(dict(pts).items())
        for (k0, e0), (k1, e1) in zip(pts, pts[1:], strict=False):
            if k0 <= k <= k1:
                return e0 + (e1 - e0) * (k - k0) / max(k1 - k0, 1)
        return pts[0][1] if k < pts[0][0] else 0.0

    ks = [max(1, round(fractions[0] * f.n_blocks)) for f in ffns]
    spent = sum(k * f.block_size for k, f in zip(ks, ffns, strict=True))
    while True:
        best, best_gain = None, 0.0
        for i, f in enumerate(ffns):
            cap = min(f.n_blocks, round(fractions[-1] * f.n_blocks))
            if ks[i] >= cap or spent + f.block_size > budget_cells:
                continue
            gain = (err_at(i, ks[i]) - err_at(i, ks[i] + 1)) / f.block_size
            if best is None or gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            return ks
        ks[best] += 1
        spent += ffns[best].block_size


def _distill(model, ffns, cal: Calibration, progress: bool) -> list[float]:
    """(c) Adam on the converted layers' tables against the dense hidden states; returns the
    loss per step."""
    params = [p for f in ffns for p in _tables_of(f) if p is not None]
    comps = [f.comp for f in ffns if f.comp is not None]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params + comps:
        p.requires_grad_(True)
    for f in ffns:  # the teacher: the dense FFNs as they were before distillation
        f._teacher = tuple(None if p is None else p.detach().clone() for p in _tables_of(f))
    opt = torch.optim.Adam(params + comps, lr=cal.lr)
    gen = torch.Generator().manual_seed(cal.seed)
    losses = []
    try:
        order = []
        for _ in _progress(range(cal.distill_steps), progress, desc="distill", leave=False):
            if not order:
                order = torch.randperm(len(cal.batches), generator=gen).tolist()
            b = cal.batches[order.pop()]
            mask = _mask(b)
            with torch.no_grad(), _Dense(ffns):
                refs = [_tokens(h, mask).float() for h in _hidden(model, b)[1:]]
            hs = [_tokens(h, mask).float() for h in _hidden(model, b)[1:]]
            loss = sum(((h - r) ** 2).mean() / (r * r).mean().clamp_min(1e-12)
                       for h, r in zip(hs, refs, strict=True)) / len(refs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for f in ffns:
            f.__dict__.pop("_teacher", None)
        for p in params + comps:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
    return losses


@torch.no_grad()
def _layer_summary(model, ffns, batches) -> list[tuple[float, float]]:
    """(kept activation mass, relative output error) per layer on the batches, in one pass."""
    stats = [[0.0, 0.0, 0.0, 0.0] for _ in ffns]
    mask = [None]

    def make_hook(i, f):
        def hook(module, args, out):
            x = _tokens(args[0], mask[0])
            y = _tokens(out, mask[0]).float()
            h = _cell_acts(f, x).abs()
            idx = f.select(x).long()
            sel = torch.zeros(x.shape[0], f.n_blocks, device=x.device).scatter_(1, idx, 1.0)
            stats[i][0] += float((h.view(x.shape[0], f.n_blocks, -1) * sel[:, :, None]).sum())
            stats[i][1] += float(h.sum())
            dense = _dense_ffn(f, x).float()
            ob = 0.0 if f.out_bias is None else f.out_bias.float()
            stats[i][2] += float(((y - dense) ** 2).sum())
            stats[i][3] += float(((dense - ob) ** 2).sum())
        return hook

    handles = [f.register_forward_hook(make_hook(i, f)) for i, f in enumerate(ffns)]
    try:
        for b in batches:
            mask[0] = _mask(b)
            _run(model, b)
    finally:
        for h in handles:
            h.remove()
    return [(s[0] / max(s[1], 1e-30), math.sqrt(s[2] / max(s[3], 1e-30))) for s in stats]


# --------------------------------------------------------------------------- entry points
def _select_sites(model, layers) -> list[_Site]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, ConvertedFFN) for m in model.modules()):
        raise ValueError("model already holds converted layers (ConvertedFFN); convert the "
                         "dense model")
    sites = find_ffns(model)
    if not sites:
        raise ValueError(
            f"found no supported FFN in {type(model).__name__}: sfnn.convert recognises "
            f"BERT-family layers (Bert/Roberta/XLMRoberta/Camembert/Electra Intermediate + "
            f"Output), GPT-2 (GPT2MLP) and LLaMA-family gated MLPs (LlamaMLP, MistralMLP, "
            f"Qwen2MLP); register an adapter in sfnn.conversion.ADAPTERS for "
            f"other architectures")
    if layers is None:
        return sites
    chosen = []
    for key in layers:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"layers must hold ints (FFN order) or module names, got {key!r}")
        if isinstance(key, int):
            if not -len(sites) <= key < len(sites):
                raise ValueError(f"layers: index {key} out of range; the model has "
                                 f"{len(sites)} FFNs")
            chosen.append(sites[key])
        else:
            match = [s for s in sites if s.name == key]
            if not match:
                raise ValueError(f"layers: {key!r} is not an FFN owner; found "
                                 f"{[s.name for s in sites]}")
            chosen.append(match[0])
    if not chosen:
        raise ValueError("layers must name at least one FFN")
    return list({id(s.owner): s for s in chosen}.values())


def _top_k_for(d_ff: int, block_size: int, top_k, density, name: str) -> int:
    if d_ff % block_size:
        raise ValueError(f"block_size={block_size} must divide d_ff={d_ff} (layer {name!r})")
    nb = d_ff // block_size
    if top_k is not None:
        if top_k > nb:
            raise ValueError(f"top_k={top_k} must be <= n_blocks = d_ff // block_size = {nb} "
                             f"(layer {name!r})")
        return top_k
    return max(1, min(nb, round(density * nb)))


def _activation_name(site: _Site, act: nn.Module, override: str | None) -> str:
    name = override or _match_activation(act)
    if name is None:
        raise ValueError(f"layer {site.name!r}: its activation {act!r} is none of sfnn's "
                         f"{ACTIVATIONS} (GPT-2's gelu_new and Gemma's gelu_pytorch_tanh are "
                         f"tanh-approximated GELU); pass activation=... to use one of those in "
                         f"its place")
    return name


def convert(model: nn.Module, *, block_size: int, top_k: int | None = None,
            density: float | None = None, cluster: bool = True,
            calibration: Calibration | Sequence | None = None, layers=None,
            activation: str | None = None, seed: int = 0,
            progress: bool = True) -> ConversionReport:
    """Swap the dense FFNs of a Hugging Face model for Avg-K sparse FFNs, in place.

    Args:
        model: a BERT-family (BERT, RoBERTa, MiniLM, ...), GPT-2 or LLaMA-family (LLaMA,
            Mistral, Qwen2: gated MLPs) model, any head.
        block_size: cells per block g; must divide each converted layer's d_ff.
        top_k: blocks per token, or ``density``: the share of cells computed per token
            (``top_k = round(density * n_blocks)``, at least 1). Exactly one of the two.
        cluster: permute each layer's cells into balanced clusters of similar keys first
            (:func:`cluster_cells`; exact: the dense function is unchanged).
        calibration: None, a sequence of input batches (fits (a) scores and (b) compensation),
            or a :class:`Calibration`.
        layers: which FFNs (ints in module order, or owner module names); default all.
        activation: override the activation read from the model (e.g. "gelu" for GPT-2's
            tanh-approximated gelu_new, which sfnn does not compute).
        seed: clustering seed. progress: tqdm bars and a printed per-layer summary.

    Returns:
        A :class:`ConversionReport` (per layer: density, clustering time, kept activation mass
        and relative error on the calibration inputs). At ``top_k == n_blocks`` without
        calibration the converted model computes what the dense one did (fp32: ~1e-6).

    Example:
        >>> report = sfnn.convert(model, block_size=32, density=0.5, calibration=batches)
    """
    t0 = time.perf_counter()
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if (top_k is None) == (density is None):
        raise ValueError("give exactly one of top_k and density")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration(batches=calibration)
    if calibration is not None:
        calibration.batches = list(calibration.batches)
        if not calibration.batches:
            raise ValueError("calibration needs at least one batch")
    sites = _select_sites(model, layers)
    plan = []
    for s in sites:
        t = s.adapter.tables(s.owner)
        k = _top_k_for(t.keys.shape[0], block_size, top_k, density, s.name)
        plan.append((s, t, k, _activation_name(s, t.act, activation)))

    ffns, rows = [], []
    bar = _progress(plan, progress and cluster, desc="cluster", leave=False)
    for s, t, k, act_name in bar:
        tc = time.perf_counter()
        cells = [t.keys, t.values, t.key_bias, t.gate_keys, t.gate_bias]
        with torch.no_grad():
            if cluster:  # by the keys Avg-K scores: the gate keys of a gated MLP
                scored = t.keys if t.gate_keys is None else t.gate_keys
                perm = cluster_cells(scored, block_size, seed=seed).to(scored.device)
                cells = [None if c is None else c[perm] for c in cells]
        keys, values, kb, gk, gb = cells
        ffn = ConvertedFFN.from_weights(keys, values, kb, t.out_bias, block_size=block_size,
                                        top_k=k, activation=act_name, gate_keys=gk, gate_bias=gb)
        ffn.train(s.owner.training)
        s.adapter.install(s, ffn)
        ffns.append(ffn)
        rows.append(dict(name=s.name, kind=s.adapter.kind, d_ff=ffn.d_ff, block_size=block_size,
                         top_k=k, density=k / ffn.n_blocks, cluster_s=time.perf_counter() - tc,
                         kept_mass=None, rel_err=None))

    if calibration is not None:
        _calibrate(model, ffns, calibration, progress)
        summary = _layer_summary(model, ffns, calibration.batches)
        for r, f, (kept, err) in zip(rows, ffns, summary, strict=True):
            r.update(top_k=f.top_k, density=f.top_k / f.n_blocks, kept_mass=kept, rel_err=err)
    report = ConversionReport(rows, time.perf_counter() - t0)
    if progress:
        print(report)
    return report


def _calibrate(model, ffns, cal: Calibration, progress: bool) -> None:
    was_training = model.training
    model.eval()
    try:
        if cal.allocate:
            # Within half to 1.5 times the mean density: measured without the tables, wider
            # swings overrate what a layer loses (on MiniLM, 1/8..1 made it worse than uniform).
            budget = sum(f.top_k * f.block_size for f in ffns)
            d = budget / sum(f.d_ff for f in ffns)
            fractions = tuple(sorted({d / 2, d, min(1.0, 1.5 * d)}))
            sub = cal.batches[:max(1, len(cal.batches) // 4)]
            errs = _sensitivity(model, ffns, sub, fractions)
            for f, k in zip(ffns, _allocate(ffns, errs, fractions, budget), strict=True):
                f.top_k = k
        if cal.scores or cal.compensation:
            for f in _progress(ffns, progress, desc="calibrate", leave=False):
                x = _capture(model, f, cal.batches).to(f.key_weight.device)
                for rnd in range(2 if (cal.scores and cal.compensation) else 1):
                    if cal.scores:
                        f.set_scores(*fit_scores(f, x, f.comp if rnd else None,
                                                 ridge=cal.ridge))
                    if cal.compensation:
                        f.set_compensation(fit_compensation(f, x, trim=cal.trim))
        if cal.distill_steps:
            _distill(model, ffns, cal, progress)
    finally:
        model.train(was_training)


def restore(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True,
            activation: str | None = None) -> nn.Module:
    """Rebuild a converted model from its state dict onto a freshly built dense model of the
    same architecture and config (e.g. ``AutoModel.from_config(config)``), then load it.

    Each converted layer's block_size and top_k come from its ``_extra_state`` entry; the
    permuted weights and any fitted tables come from the state dict. Returns ``model``.
    """
    for s in _select_sites(model, None):
        prefix = s.ffn_name + "."
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            continue
        block_size, top_k = (int(v) for v in torch.as_tensor(extra).tolist())
        t = s.adapter.tables(s.owner)
        ffn = ConvertedFFN.from_weights(t.keys, t.values, t.key_bias, t.out_bias,
                                        block_size=block_size, top_k=top_k,
                                        activation=_activation_name(s, t.act, activation),
                                        gate_keys=t.gate_keys, gate_bias=t.gate_bias)
        s.adapter.install(s, ffn)
    model.load_state_dict(dict(state_dict), strict=strict)
    return model
