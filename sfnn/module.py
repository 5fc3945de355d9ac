"""``SparseFFN``: the drop-in Avg-K sparse feed-forward layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from ._activations import ACTIVATIONS
from .cache import BlockMeansCache
from .functional import _check_choice, _check_int, sparse_ffn


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

    Shapes: input (..., d_model) -> output (..., d_model).

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
                 deterministic: bool = False, device=None, dtype=None):
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
        factory = {"device": device, "dtype": dtype}
        self.key_weight = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        self.value_weight = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        if bias:
            self.key_bias = nn.Parameter(torch.empty(d_ff, **factory))
            self.out_bias = nn.Parameter(torch.empty(d_model, **factory))
        else:
            self.register_parameter("key_bias", None)
            self.register_parameter("out_bias", None)
        self.means_cache = BlockMeansCache()
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_rename_legacy_keys, with_module=True)
        self.register_load_state_dict_post_hook(_clear_means_cache)

    @property
    def n_blocks(self) -> int:
        return self.d_ff // self.block_size

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of fc1 (d_model -> d_ff) and fc2 (d_ff -> d_model):
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases alike."""
        bound1, bound2 = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_ff)
        with torch.no_grad():
            self.key_weight.uniform_(-bound1, bound1)
            self.value_weight.uniform_(-bound2, bound2)
            if self.key_bias is not None:
                self.key_bias.uniform_(-bound1, bound1)
                self.out_bias.uniform_(-bound2, bound2)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_ffn(x, self.key_weight, self.value_weight, block_size=self.block_size,
                          top_k=self.top_k, key_bias=self.key_bias, out_bias=self.out_bias,
                          activation=self.activation, backend=self.backend,
                          deterministic=self.deterministic, means_cache=self._serving_cache())

    def _serving_cache(self) -> BlockMeansCache | None:
        """The cache this call may use: in eval mode, and only for the layer's own stored keys
        (not a parametrization's or functional_call's tensors, which are new on every call and
        would each be kept alive by the entry)."""
        if self.training or not isinstance(self._parameters.get("key_weight"), nn.Parameter):
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

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "means_cache" not in self.__dict__:  # pickled by sfnn 0.1
            self.means_cache = BlockMeansCache()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
                f"top_k={self.top_k}, activation={self.activation!r}, "
                f"key_bias={self.key_bias is not None}, out_bias={self.out_bias is not None}, "
                f"backend={self.backend!r}")


def _clear_means_cache(module, incompatible_keys) -> None:
    module.refresh_block_means()


# sfnn 0.1 named the tables ``keys`` and ``values``; their checkpoints load under the new names.
_LEGACY_NAMES = {"keys": "key_weight", "values": "value_weight"}


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for old, new in _LEGACY_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
