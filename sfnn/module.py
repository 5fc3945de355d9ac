"""``SparseFFN``: the drop-in sparse feed-forward layer (Avg-K, or another selection method)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from ._activations import ACTIVATIONS
from .cache import BlockMeansCache
from .functional import _check_choice, _check_int, _check_weight, sparse_ffn
from .selection import (
    METHODS,
    ROUTER_METHODS,
    accumulate_usage,
    balanced_hash_table,
    call_seed,
    init_router_,
    usage_summary,
)

__all__ = ["SparseFFN", "aux_loss"]


class SparseFFN(nn.Module):
    """A feed-forward layer ``d_model -> d_ff -> d_model`` that computes, per token, only the
    ``top_k`` blocks of ``block_size`` cells whose mean key scores highest (Avg-K).

    Parameters (stored row-per-cell so a block is contiguous):
        key_weight: (d_ff, d_model), like ``fc1.weight`` (the cells' keys); value_weight:
        (d_ff, d_model), like ``fc2.weight.T`` (the cells' values); key_bias: (d_ff,);
        out_bias: (d_model,); both None when ``bias=False``. Initialised as ``nn.Linear``
        initialises fc1 and fc2. (Not ``keys``/``values``: those names are ``nn.ModuleDict``
        methods, and ``torch.nn.utils.parametrize`` keeps parametrizations in a ModuleDict
        keyed by parameter name. Checkpoints saved with the old names still load.)

    Gated (``gated=True``; SwiGLU with ``activation="silu"``, GeGLU with ``"gelu"``): adds
        ``gate_weight`` (d_ff, d_model), like ``gate_proj.weight``, and ``gate_bias`` (d_ff,)
        (None when ``bias=False``); the cell is ``act(x . gate_weight_i + gate_bias_i) *
        (x . key_weight_i + key_bias_i)`` (``key_weight`` is ``up_proj.weight``,
        ``value_weight`` ``down_proj.weight.T``), and Avg-K scores the gate table's block means.
        :meth:`from_dense_gated` copies a LLaMA-style MLP.

    Shapes: input (..., d_model) -> output (..., d_model); ``forward(x, token_ids=None)``.

    Selection (``selection=``; the paper's comparison, see :mod:`sfnn.selection`):
        ``"avgk"`` (default): the blocks whose mean key scores highest, no gate, no extra
        parameter or loss; with ``block_size=1`` the exact top-k over cells.
        ``"switch"``: a learned router ``router_weight`` (n_blocks, d_model) (Switch
        Transformer's initialisation); the top_k blocks by logit, each scaled by its softmax
        probability. ``"moe"``: the same router, the chosen blocks scaled by the softmax over
        their logits. Both add the balancing loss (weight ``balance_loss_weight``, Switch's
        0.01) and, with ``z_loss_weight > 0``, the router z-loss to :meth:`aux_loss`.
        ``"hash"``: HashLayer; needs ``vocab_size`` and ``forward(x, token_ids=ids)``; the map
        is the buffer ``hash_table`` (vocab_size, top_k), balanced and seeded by ``seed``.
        ``"random"``: top_k distinct blocks drawn uniformly per token per call, a control; the
        draws follow the buffers ``random_seed`` (``seed``) and ``random_calls`` (calls so
        far), so a seeded layer repeats its draws and a checkpoint resumes the stream.
        Routing is dropless: no capacity factor, no token is dropped. ``token_ids`` is ignored
        by every method but hash.
        ``seed`` (hash, random): an int; None draws one from the default generator, so
        ``torch.manual_seed`` before construction makes the layer reproducible (the other
        methods draw nothing, so their initialisation is Avg-K's).

    Training with an auxiliary loss: ``loss = task_loss + sfnn.aux_loss(model)`` (the sum of
    every sparse layer's :meth:`aux_loss`, zero for methods without one).

    Block usage (``track_usage=True``, off by default): every call adds, on the device and with
    no host sync, how many (token, slot) pairs chose each block to the buffer ``usage_counts``
    (n_blocks,) int64; :meth:`usage_stats` summarises it, :meth:`reset_usage` zeroes it.

    Block means: in training mode they are recomputed on every call (one read of
    ``key_weight``, which training reads anyway). In eval mode the layer keeps them in
    ``means_cache`` (a :class:`sfnn.BlockMeansCache`; set it to None to never cache) while the
    keys take no part in autograd and ``key_weight`` is the stored parameter (not a
    parametrization's output); every optimizer step, in-place update, ``train()``/``eval()``,
    ``load_state_dict`` and ``to()`` invalidates it. Writes nothing can see (``param.data``
    writes, ``dist.broadcast``, numpy aliases) need ``refresh_block_means()`` (see
    :func:`sfnn.block_means`).

    Example:
        >>> ffn = sfnn.SparseFFN(512, 8192, block_size=64, top_k=16, activation="gelu")
        >>> y = ffn(torch.randn(4, 128, 512))
    """

    def __init__(self, d_model: int, d_ff: int, *, block_size: int = 64, top_k: int = 8,
                 activation: str = "relu", bias: bool = True, backend: str = "auto",
                 deterministic: bool = False, selection: str = "avgk",
                 vocab_size: int | None = None, track_usage: bool = False,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 0.0,
                 seed: int | None = None, gated: bool = False, device=None, dtype=None):
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("d_ff", d_ff)
        _check_int("block_size", block_size)
        _check_int("top_k", top_k)
        if d_ff % block_size:
            raise ValueError(f"block_size={block_size} must divide d_ff={d_ff}")
        if top_k > d_ff // block_size:
            raise ValueError(f"top_k={top_k} must be <= n_blocks = d_ff // block_size = "
                             f"{d_ff // block_size}")
        self.d_model, self.d_ff = d_model, d_ff
        self.block_size, self.top_k = block_size, top_k
        self.activation = _check_choice("activation", activation, ACTIVATIONS)
        self.backend = _check_choice("backend", backend, ops.BACKENDS)
        self.deterministic = deterministic
        self.selection = _check_choice("selection", selection, METHODS)
        if selection == "hash":
            if vocab_size is None:
                raise ValueError("selection='hash' needs vocab_size, the number of token ids "
                                 "(SparseFFN(..., selection='hash', vocab_size=V)); then call "
                                 "ffn(x, token_ids=ids)")
            _check_int("vocab_size", vocab_size)
        elif vocab_size is not None:
            _check_int("vocab_size", vocab_size)
        self.vocab_size = vocab_size
        self.track_usage = bool(track_usage)
        if not isinstance(gated, bool):
            raise TypeError(f"gated must be a bool, got {type(gated).__name__}")
        self.gated = gated
        self.balance_loss_weight = _check_weight("balance_loss_weight", balance_loss_weight)
        self.z_loss_weight = _check_weight("z_loss_weight", z_loss_weight)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if seed is None and selection in ("hash", "random"):
            seed = int(torch.randint(0, 2**62, ()).item())  # the CPU default generator
        self.seed = seed
        factory = {"device": device, "dtype": dtype}
        self.key_weight = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        self.value_weight = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        if bias:
            self.key_bias = nn.Parameter(torch.empty(d_ff, **factory))
            self.out_bias = nn.Parameter(torch.empty(d_model, **factory))
        else:
            self.register_parameter("key_bias", None)
            self.register_parameter("out_bias", None)
        if gated:
            self.gate_weight = nn.Parameter(torch.empty(d_ff, d_model, **factory))
            if bias:
                self.gate_bias = nn.Parameter(torch.empty(d_ff, **factory))
            else:
                self.register_parameter("gate_bias", None)
        else:
            self.register_parameter("gate_weight", None)
            self.register_parameter("gate_bias", None)
        if selection in ROUTER_METHODS:
            self.router_weight = nn.Parameter(torch.empty(self.n_blocks, d_model, **factory))
        else:
            self.register_parameter("router_weight", None)
        self.hash_table: torch.Tensor | None
        if selection == "hash":
            table = balanced_hash_table(vocab_size, self.n_blocks, top_k, seed=seed)
            self.register_buffer("hash_table", table.to(device))
        else:
            self.register_buffer("hash_table", None)
        self.random_seed: torch.Tensor | None
        self.random_calls: torch.Tensor | None
        if selection == "random":
            self.register_buffer("random_seed", torch.tensor(seed, dtype=torch.int64,
                                                             device=device))
            self.register_buffer("random_calls", torch.zeros((), dtype=torch.int64,
                                                             device=device))
        else:
            self.register_buffer("random_seed", None)
            self.register_buffer("random_calls", None)
        self.register_buffer("usage_counts", torch.zeros(self.n_blocks, dtype=torch.int64,
                                                         device=device), persistent=False)
        self._last_aux_loss: torch.Tensor | None = None
        self.means_cache = BlockMeansCache()
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_rename_legacy_keys, with_module=True)
        self._register_load_state_dict_pre_hook(_check_selection_state, with_module=True)
        self.register_load_state_dict_post_hook(_explain_selection_keys)
        self.register_load_state_dict_post_hook(_clear_means_cache)

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of fc1 (d_model -> d_ff) and fc2 (d_ff -> d_model):
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases alike (a gated layer's gate
        table as fc1); a router (switch, moe) gets Switch Transformer's truncated normal,
        std sqrt(0.1 / d_model)."""
        bound1, bound2 = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_ff)
        with torch.no_grad():
            self.key_weight.uniform_(-bound1, bound1)
            self.value_weight.uniform_(-bound2, bound2)
            if self.key_bias is not None:
                self.key_bias.uniform_(-bound1, bound1)
                self.out_bias.uniform_(-bound2, bound2)
            if self.gate_weight is not None:
                self.gate_weight.uniform_(-bound1, bound1)
            if self.gate_bias is not None:
                self.gate_bias.uniform_(-bound1, bound1)
        if self.router_weight is not None:
            init_router_(self.router_weight)

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, *, block_size: int, top_k: int,
                   activation: str = "relu", **kwargs) -> SparseFFN:
        """A SparseFFN holding copies of a dense FFN's weights: ``act(fc1(x))`` then ``fc2``.

        ``fc1`` must be ``nn.Linear(d_model, d_ff)`` and ``fc2`` ``nn.Linear(d_ff, d_model)``.
        At ``top_k == d_ff // block_size`` the result equals the dense FFN. A bias missing from
        either layer stays None here.
        """
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise TypeError("fc1 and fc2 must be nn.Linear")
        d_ff, d_model = fc1.weight.shape
        if tuple(fc2.weight.shape) != (d_model, d_ff):
            raise ValueError(f"fc2 must map d_ff={d_ff} -> d_model={d_model}; got weight "
                             f"{tuple(fc2.weight.shape)}")
        w = fc1.weight
        ffn = cls(d_model, d_ff, block_size=block_size, top_k=top_k, activation=activation,
                  bias=True, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            ffn.key_weight.copy_(fc1.weight)
            ffn.value_weight.copy_(fc2.weight.t())
            for name, src in (("key_bias", fc1.bias), ("out_bias", fc2.bias)):
                if src is None:
                    setattr(ffn, name, None)
                else:
                    getattr(ffn, name).copy_(src)
        return ffn

    @classmethod
    def from_dense_gated(cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, *,
                         block_size: int, top_k: int, activation: str = "silu",
                         **kwargs) -> SparseFFN:
        """A gated SparseFFN holding copies of a dense gated FFN's weights:
        ``down_proj(act(gate_proj(x)) * up_proj(x))`` (LLaMA's MLP with ``activation="silu"``,
        GeGLU with ``"gelu"``).

        ``gate_proj`` and ``up_proj`` must be ``nn.Linear(d_model, d_ff)`` and ``down_proj``
        ``nn.Linear(d_ff, d_model)``. At ``top_k == d_ff // block_size`` the result equals the
        dense gated FFN. A bias missing from a layer stays None here (LLaMA has none).

        Example:
            >>> mlp = model.model.layers[0].mlp   # a LlamaMLP
            >>> ffn = sfnn.SparseFFN.from_dense_gated(mlp.gate_proj, mlp.up_proj, mlp.down_proj,
            ...                                       block_size=64, top_k=32)
        """
        for name, lin in (("gate_proj", gate_proj), ("up_proj", up_proj),
                          ("down_proj", down_proj)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name} must be nn.Linear, got {type(lin).__name__}")
        d_ff, d_model = gate_proj.weight.shape
        if tuple(up_proj.weight.shape) != (d_ff, d_model):
            raise ValueError(f"up_proj must map d_model={d_model} -> d_ff={d_ff} like gate_proj; "
                             f"got weight {tuple(up_proj.weight.shape)}")
        if tuple(down_proj.weight.shape) != (d_model, d_ff):
            raise ValueError(f"down_proj must map d_ff={d_ff} -> d_model={d_model}; got weight "
                             f"{tuple(down_proj.weight.shape)}")
        if "gated" in kwargs:
            raise TypeError("from_dense_gated always builds a gated layer: drop gated=")
        w = gate_proj.weight
        ffn = cls(d_model, d_ff, block_size=block_size, top_k=top_k, activation=activation,
                  bias=True, gated=True, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            ffn.gate_weight.copy_(gate_proj.weight)
            ffn.key_weight.copy_(up_proj.weight)
            ffn.value_weight.copy_(down_proj.weight.t())
            for name, src in (("gate_bias", gate_proj.bias), ("key_bias", up_proj.bias),
                              ("out_bias", down_proj.bias)):
                if src is None:
                    setattr(ffn, name, None)
                else:
                    getattr(ffn, name).copy_(src)
        return ffn

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d_model) -> (..., d_model). ``token_ids`` (x's leading shape, integer in
        [0, vocab_size)) are needed by ``selection="hash"`` and ignored otherwise."""
        seed = None
        if self.selection == "random":
            seed = call_seed(self.random_seed, self.random_calls)
            with torch.no_grad():
                self.random_calls.add_(1)
        y, sel = sparse_ffn(
            x, self.key_weight, self.value_weight, block_size=self.block_size, top_k=self.top_k,
            key_bias=self.key_bias, out_bias=self.out_bias, activation=self.activation,
            backend=self.backend, deterministic=self.deterministic,
            means_cache=self._serving_cache() if self.selection == "avgk" else None,
            selection=self.selection, router_weight=self.router_weight, token_ids=token_ids,
            hash_table=self.hash_table, seed=seed, balance_loss_weight=self.balance_loss_weight,
            z_loss_weight=self.z_loss_weight, return_selection=True,
            gate_keys=self.gate_weight, gate_bias=self.gate_bias)
        self._last_aux_loss = sel.aux_loss
        if self.track_usage:
            accumulate_usage(self.usage_counts, sel.indices)
        return y

    def aux_loss(self) -> torch.Tensor:
        """() the auxiliary loss of the last forward, to add to the training loss:
        ``balance_loss_weight * balancing loss + z_loss_weight * z-loss`` for switch/moe
        (differentiable with respect to the router and the input), zero for the methods
        without one and before the first forward. float32 (float64 for float64 inputs).
        :func:`sfnn.aux_loss` sums it over a model's sparse layers."""
        if self._last_aux_loss is None:
            return torch.zeros((), device=self.key_weight.device)
        return self._last_aux_loss

    def usage_stats(self) -> dict:
        """Summary of the block usage counted since construction or :meth:`reset_usage` (reads
        the counts: one host sync). A dict: ``counts`` (n_blocks,) int64 on the CPU, ``total``,
        ``cv`` (std / mean of the load), ``entropy`` (normalised: 1 is uniform),
        ``dead_fraction`` (blocks never chosen), ``max_over_mean``; see
        :func:`sfnn.selection.usage_summary`."""
        stats = usage_summary(self.usage_counts)
        if not self.track_usage and stats["total"] == 0:
            raise RuntimeError("block usage is not being counted: build the layer with "
                               "SparseFFN(..., track_usage=True) or set ffn.track_usage = True "
                               "before the calls to count")
        return stats

    def reset_usage(self) -> None:
        """Zero the block-usage counts."""
        with torch.no_grad():
            self.usage_counts.zero_()

    def _serving_cache(self) -> BlockMeansCache | None:
        """The cache this call may use: in eval mode, and only for the layer's own stored keys
        (not a parametrization's or functional_call's tensors, which are new on every call and
        would each be kept alive by the entry). A gated layer's means are the gate table's."""
        scored = "gate_weight" if self.gated else "key_weight"
        if self.training or not isinstance(self._parameters.get(scored), nn.Parameter):
            return None
        return self.means_cache

    def refresh_block_means(self) -> None:
        """Forget the cached block means; the next eval-mode call recomputes them. Needed only
        after writes the cache cannot see (``param.data`` writes, ``dist.broadcast``, numpy
        aliases) into a layer in eval mode."""
        if self.means_cache is not None:
            self.means_cache.clear()

    def train(self, mode: bool = True) -> SparseFFN:
        self.refresh_block_means()
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        # to(), double(), cuda(), to_empty(), ... (also when they swap tensors in place).
        self.refresh_block_means()
        return super()._apply(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # The last aux loss carries its autograd graph, which cannot be copied or pickled.
        return {**state, "_last_aux_loss": None}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "means_cache" not in self.__dict__:  # pickled by sfnn 0.1
            self.means_cache = BlockMeansCache()
        for name, default in (("selection", "avgk"), ("vocab_size", None), ("track_usage", False),
                              ("balance_loss_weight", 0.01), ("z_loss_weight", 0.0),
                              ("seed", 0), ("_last_aux_loss", None), ("gated", False)):
            self.__dict__.setdefault(name, default)
        for name in ("gate_weight", "gate_bias"):  # pickled before gated layers existed
            self._parameters.setdefault(name, None)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
                f"top_k={self.top_k}, activation={self.activation!r}, "
                f"key_bias={self.key_bias is not None}, out_bias={self.out_bias is not None}, "
                f"backend={self.backend!r}, selection={self.selection!r}"
                + (f", vocab_size={self.vocab_size}" if self.selection == "hash" else "")
                + (", track_usage=True" if self.track_usage else "")
                + (", gated=True" if self.gated else ""))


def _clear_means_cache(module, incompatible_keys) -> None:
    module.refresh_block_means()


# sfnn 0.1 named the tables ``keys`` and ``values``; their checkpoints load under the new names.
_LEGACY_NAMES = {"keys": "key_weight", "values": "value_weight"}


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for old, new in _LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


# The state each selection method keeps in a checkpoint, and the methods that keep it.
_SELECTION_STATE = {"router_weight": ROUTER_METHODS, "hash_table": ("hash",),
                    "random_seed": ("random",), "random_calls": ("random",)}


class _ExplainedKey(str):
    """A state_dict key that equals its name (so ``missing_keys`` and ``unexpected_keys`` still
    compare equal to plain keys) but is formatted with the reason and the fix, so that
    ``load_state_dict(strict=True)``'s error message (which formats each key) names them, while
    ``strict=False`` loads quietly as usual."""

    def __new__(cls, key: str, why: str):
        self = super().__new__(cls, key)
        self.why = why
        return self

    def __format__(self, spec) -> str:
        return format(f"{str(self)}: {self.why}", spec)


def _check_selection_state(module, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs) -> None:
    """Before loading: a hash table of another shape is refused with the fix. (torch passes
    ``strict=True`` to every hook whatever the caller asked, so missing and unexpected
    selection state is explained after loading, by :func:`_explain_selection_keys`.)"""
    module._load_prefix = prefix
    key = prefix + "hash_table"
    if module.hash_table is not None and key in state_dict:
        theirs, ours = tuple(state_dict[key].shape), tuple(module.hash_table.shape)
        if theirs != ours:
            raise RuntimeError(
                f"the checkpoint's {key} is (vocab_size, top_k) = {theirs} but this layer's is "
                f"{ours}: build the layer with vocab_size={theirs[0]} and top_k={theirs[1]}.")


def _explain_selection_keys(module, incompatible_keys) -> None:
    """After loading: selection state the checkpoint lacks (a router, hash table or random
    stream, saved from a layer with another method) or holds in excess is reported with the
    fix when the load is strict."""
    prefix = module.__dict__.pop("_load_prefix", "")
    sel = module.selection
    for name, methods in _SELECTION_STATE.items():
        key = prefix + name
        owners = " or ".join(repr(m) for m in methods)
        for keys, why in (
                (incompatible_keys.missing_keys,
                 f"the checkpoint comes from a layer without {name} (a selection method other "
                 f"than {owners}) but this layer has selection={sel!r}; build the layer with the "
                 f"checkpoint's selection method, or load with strict=False to keep this layer's "
                 f"own {name}"),
                (incompatible_keys.unexpected_keys,
                 f"{name} is kept by selection={owners} but this layer has selection={sel!r}; "
                 f"build it with SparseFFN(..., selection={methods[0]!r}"
                 f"{', vocab_size=V' if name == 'hash_table' else ''}), or load with "
                 f"strict=False to drop it")):
            if key in keys:
                keys[keys.index(key)] = _ExplainedKey(key, why)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """() the sum of :meth:`SparseFFN.aux_loss` over every sparse layer in ``model`` (itself
    included): the term a training loop adds to its loss, whatever the layers' selection
    methods (zero when none has a router, or when ``model`` holds no sparse layer).

    Example:
        >>> loss = F.cross_entropy(logits, targets) + sfnn.aux_loss(model)
    """
    from .distributed import BlockParallelSparseFFN

    total = None
    for m in model.modules():
        if isinstance(m, (SparseFFN, BlockParallelSparseFFN)):
            a = m.aux_loss()
            total = a if total is None else total + a.to(total.device)
    if total is None:
        return torch.zeros(())
    return total
