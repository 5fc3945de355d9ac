"""The block-means cache: one layer's ``kbar``/``bbar`` kept between calls while they are valid.

Decoding reads only the selected blocks, so recomputing ``kbar`` (one read of the whole keys
table) on every call would cost as much as the dense FFN. Training reads every block's keys
anyway at realistic token counts, so there the means are simply recomputed. Hence:

- A :class:`BlockMeansCache` belongs to its layer (``SparseFFN.means_cache``); a functional
  caller owns one by passing ``means_cache=`` to :func:`sfnn.sparse_ffn`. Nothing is attached
  to user tensors (no weak references, so ``torch.utils.swap_tensors`` works), and there is no
  process-wide table. The entry holds strong references to the keys and key bias it was filled
  from, so ``SparseFFN`` uses its cache only for its own stored parameters (a parametrization
  makes new tensors on every call).
- It serves only where the keys take no part in autograd (``torch.no_grad()``/``inference_mode``,
  or keys that do not require grad) and steps aside, recomputing, under ``torch.compile``
  tracing, ``torch.func`` transforms, CUDA-graph capture, for inference tensors (they have no
  version counter), tensor subclasses and meta tensors. ``SparseFFN`` uses it in eval mode
  only.
- An entry is valid while: no optimizer has stepped since it was filled (a global
  ``torch.optim`` step hook, so fused and foreach optimizers are seen), no one has called
  :func:`refresh_block_means`, and the keys and key bias are the same tensor objects as when it
  was filled (held by the entry, so an id cannot be reused) with the same version counter, data
  pointer, dtype, device and shape. ``SparseFFN`` also clears its cache on ``train()``/``eval()``,
  ``load_state_dict`` and ``to()``/``double()``/... (``_apply``).

What stays unseen: a write that bypasses the version counter (``param.data`` writes, a numpy or
DLPack alias, ``vector_to_parameters`` followed by writes to the vector, collectives such as
``dist.broadcast``, a fused kernel outside ``torch.optim``) into a layer in eval mode with no
optimizer step, mode switch or ``load_state_dict`` after it. After such a write call
``sfnn.refresh_block_means(model)`` (or ``ffn.refresh_block_means()``).

Room for later: :meth:`BlockMeansCache.compute` is the one place the means are computed, so a
block-parallel layer can subclass it to all-gather ``kbar``, and a low-precision ``kbar`` for
GPU decoding would be one more field of the cache, checked with the entry.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops

Tensor = torch.Tensor

__all__ = ["BlockMeansCache", "refresh_block_means", "fresh_block_means"]

# Bumped by every optimizer step of any torch.optim optimizer and by refresh_block_means(): an
# entry filled under another generation is stale.
_generation = 0

# Tensor types whose identity, version counter and data pointer describe their contents.
_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _bump_generation(*_args, **_kwargs) -> None:
    global _generation
    _generation += 1


# Fires after Optimizer.step of every optimizer, fused ones included (whose kernels do not bump
# the parameters' version counters).
_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_bump_generation)


def _cuda_graph_capturing(t: Tensor) -> bool:
    """True while ``t`` is a CUDA tensor and the current stream is being captured."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _cacheable(t: Tensor | None) -> bool:
    if t is None:
        return True
    return type(t) in _PLAIN_TYPES and not t.is_inference() and not t.is_meta


def cache_allowed(keys: Tensor, key_bias: Tensor | None) -> bool:
    """Whether a cache may serve (or be filled by) a call with these tables now."""
    if torch.compiler.is_compiling() or ops.functorch_active():
        return False
    if not (_cacheable(keys) and _cacheable(key_bias)):
        return False
    if torch.is_grad_enabled() and (
            keys.requires_grad or (key_bias is not None and key_bias.requires_grad)):
        return False
    return not _cuda_graph_capturing(keys)


def _state(t: Tensor | None):
    if t is None:
        return None
    return (t._version, t.data_ptr(), t.dtype, t.get_device(), t.shape)


def fresh_block_means(keys: Tensor, key_bias: Tensor | None, block_size: int,
                      backend: str) -> tuple[Tensor, Tensor | None]:
    """Block means computed now, never cached: ``kbar`` (n_blocks, d_model) and ``bbar``
    (n_blocks,) or None, float32 (float64 for float64 keys), detached."""
    kbar, bbar = ops.block_means(keys.detach(), None if key_bias is None else key_bias.detach(),
                                 block_size, backend)
    return kbar, (None if key_bias is None else bbar)


class _Entry:
    __slots__ = ("keys", "key_bias", "keys_state", "bias_state", "config", "generation", "kbar",
                 "bbar")

    def __init__(self, keys, key_bias, config, kbar, bbar):
        self.keys, self.key_bias = keys, key_bias  # strong references: ids cannot be reused
        self.keys_state, self.bias_state = _state(keys), _state(key_bias)
        self.config, self.generation = config, _generation
        self.kbar, self.bbar = kbar, bbar

    def valid_for(self, keys, key_bias, config) -> bool:
        return (self.generation == _generation and self.keys is keys
                and self.key_bias is key_bias and self.config == config
                and self.keys_state == _state(keys) and self.bias_state == _state(key_bias))


class BlockMeansCache:
    """The block means of one layer's keys, kept while the keys are unchanged.

    A layer owns one (``SparseFFN.means_cache``); a functional caller may own one and pass it
    as ``sfnn.sparse_ffn(..., means_cache=cache)`` or ``sfnn.block_means(..., means_cache=cache)``.
    It holds one entry (the last keys, key bias, ``block_size`` and backend it saw) and serves it
    while it is valid; see :mod:`sfnn.cache` for the rules and for what it cannot see.
    ``clear()`` (or :func:`sfnn.refresh_block_means`) forgets the entry.

    Copies and pickles of a cache are empty: the means are recomputed on first use.

    Example:
        >>> cache = sfnn.BlockMeansCache()
        >>> with torch.no_grad():
        ...     y = sfnn.sparse_ffn(x, keys, values, block_size=64, top_k=16, means_cache=cache)
    """

    def __init__(self) -> None:
        self._entry: _Entry | None = None

    def clear(self) -> None:
        """Forget the cached means; the next call recomputes them."""
        self._entry = None

    def compute(self, keys: Tensor, key_bias: Tensor | None, block_size: int,
                backend: str) -> tuple[Tensor, Tensor | None]:
        """Fresh means: the one place they are computed for every call made with this cache
        (fills, and calls where it may not serve), so a subclass may override it."""
        return fresh_block_means(keys, key_bias, block_size, backend)

    def _lookup(self, keys: Tensor, key_bias: Tensor | None, block_size: int,
                backend: str) -> tuple[Tensor, Tensor | None]:
        """``(kbar, bbar)`` for these tables: the cached tensors while valid, else fresh ones
        (cached when :func:`cache_allowed`). The tensors may be the cache's own, so this is
        sfnn's internal door (its callers only read them); :func:`sfnn.block_means` with
        ``means_cache=`` hands out copies."""
        if not cache_allowed(keys, key_bias):
            return self.compute(keys, key_bias, block_size, backend)
        config = (block_size, backend)
        entry = self._entry
        if entry is not None and entry.valid_for(keys, key_bias, config):
            return entry.kbar, entry.bbar
        self._entry = None
        # Normal tensors even inside inference_mode: the entry may serve outside it later.
        with torch.inference_mode(False), torch.no_grad():
            kbar, bbar = self.compute(keys, key_bias, block_size, backend)
        self._entry = _Entry(keys, key_bias, config, kbar, bbar)
        return kbar, bbar

    @property
    def filled(self) -> bool:
        """True while the cache holds an entry (valid or not: validity is checked on use)."""
        return self._entry is not None

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self._entry = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(filled={self.filled})"


def refresh_block_means(target: nn.Module | BlockMeansCache | None = None) -> None:
    """Forget cached block means, so the next call recomputes them from the current weights.

    Call it after writing weights in a way the cache cannot see (see :mod:`sfnn.cache`): e.g.
    ``dist.broadcast`` of parameters, ``param.data`` writes or writes through a numpy alias,
    into a model in eval mode.

    Args:
        target: a module (every :class:`BlockMeansCache` held as ``means_cache`` by it or its
            submodules), one cache, or None: every cache in the process.

    Example:
        >>> dist.broadcast(model.ffn.key_weight, src=0)
        >>> sfnn.refresh_block_means(model)
    """
    if target is None:
        _bump_generation()
    elif isinstance(target, BlockMeansCache):
        target.clear()
    elif isinstance(target, nn.Module):
        for module in target.modules():
            cache = getattr(module, "means_cache", None)
            if isinstance(cache, BlockMeansCache):
                cache.clear()
    else:
        raise TypeError(f"target must be an nn.Module, a BlockMeansCache or None, got "
                        f"{type(target).__name__}")
