"""sfnn: fast kernels for block-sparse feed-forward layers selected by Avg-K.

Avg-K (Liu et al., EMNLP 2023) scores each block of ``block_size`` FFN cells by the token's dot
product with the block's mean key, keeps the ``top_k`` best blocks and computes only those. The
paper's other selection methods (Switch, top-k MoE, HashLayer, random) run on the same kernels
(``selection=``, :mod:`sfnn.selection`).

Public API:
    sparse_ffn      the whole layer, functional form
    SparseFFN       the nn.Module (``from_dense`` converts two nn.Linear)
    block_means     kbar/bbar, the per-block mean keys
    select_blocks   Avg-K selection: (..., top_k) int32 block indices
    block_ffn       the compute over given block indices, with optional per-slot gates
    Selection       what a selection method decided (indices, gates, aux loss)
    aux_loss        the sum of a model's sparse layers' auxiliary losses
    balanced_hash_table  HashLayer's balanced map from token id to blocks
    BlockMeansCache a layer's cached block means (SparseFFN.means_cache), for decoding
    refresh_block_means  forget cached means after writes the cache cannot see
    convert         swap a Hugging Face model's dense FFNs for Avg-K sparse FFNs
    Calibration     what ``convert`` fits on calibration inputs (``sfnn.conversion`` has the rest)
"""
from .cache import BlockMeansCache, refresh_block_means
from .conversion import Calibration, ConvertedFFN, convert
from .distributed import BlockParallelSparseFFN as BlockParallelSparseFFN
from .functional import block_ffn, block_means, select_blocks, sparse_ffn
from .module import SparseFFN, aux_loss
from .ops import BACKENDS
from .selection import METHODS, Selection, balanced_hash_table

__version__ = "0.1.0"

__all__ = ["sparse_ffn", "SparseFFN", "block_means", "select_blocks", "block_ffn",
           "BlockMeansCache", "refresh_block_means", "convert", "Calibration", "ConvertedFFN",
           "BACKENDS", "METHODS", "Selection", "aux_loss", "balanced_hash_table", "__version__"]
