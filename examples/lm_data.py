"""The corpus and tokenizer of ``pretrain_lm.py``: the Python standard library's own sources.

Every machine that runs Python has them, so the example needs no download: the ``.py`` files
of ``sysconfig.get_paths()["stdlib"]`` (code, comments and docstrings; the Python Software
Foundation License), less third-party packages (``site-packages``/``dist-packages``), the test
suites (``test``/``tests``/``idle_test``: Debian ships them separately, so they come and go) and
two generated directories: the codec tables of ``encodings`` and ``pydoc_data`` (one 0.75 MB
file of documentation strings, which would be most of whichever split drew it). The files
differ between Python versions; the corpus is named by its version and a hash of its contents,
and the results say which one ran.

Splits are by file, never overlapping: a file goes to ``val`` or ``test`` when a hash of its
relative path falls in their share, else to ``train``. The tokenizer is a byte-level BPE
(Hugging Face ``tokenizers``) trained on the training split alone. The tokenizer and the token
arrays (uint16) are cached on disk under a key made of the corpus hash and the vocabulary size.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "encodings", "pydoc_data", "__pycache__"})


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfnn" / "pretrain_lm"


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus files, sorted by their path relative to ``root`` (the stdlib by default)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: this Python ships its standard "
                                f"library without sources (pass another --corpus-root)")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(rel_path: str, val_frac: float, test_frac: float) -> str:
    """``train``, ``val`` or ``test`` for one file, from a hash of its relative path."""
    u = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2.0**64
    if u < val_frac:
        return "val"
    if u < val_frac + test_frac:
        return "test"
    return "train"


@dataclass
class Corpus:
    """Token arrays per split (uint16), the tokenizer, and what they were made from."""

    tokens: dict[str, np.ndarray]
    tokenizer: object  # tokenizers.Tokenizer
    vocab_size: int
    info: dict  # name, files and bytes per split, corpus hash


def load_corpus(*, vocab_size: int, cache_dir: Path | None = None, root: Path | None = None,
                max_files: int | None = None, val_frac: float = 0.05, test_frac: float = 0.05,
                quiet: bool = False) -> Corpus:
    """Read the corpus, train (or load) the tokenizer and tokenize the three splits.

    ``max_files`` keeps every n-th file so that at most that many remain (the tiny preset);
    ``root`` replaces the stdlib with another directory of ``.py`` files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [257, 65536] (byte-level BPE in uint16), "
                         f"got {vocab_size}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if max_files is not None and len(files) > max_files:
        files = files[:: -(-len(files) // max_files)]
    texts = {s: [] for s in SPLITS}
    digest = hashlib.sha256()
    for p in files:
        rel = p.relative_to(root).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        texts[split_of(rel, val_frac, test_frac)].append(text)
    for s in SPLITS:
        if not texts[s]:
            raise ValueError(f"the {s} split is empty ({len(files)} files): use more files")
    corpus_hash = digest.hexdigest()[:16]
    name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib"
    key = f"{name}-{corpus_hash}-v{vocab_size}-{val_frac}-{test_frac}"
    cache = Path(cache_dir or default_cache_dir()) / key
    cache.mkdir(parents=True, exist_ok=True)

    tok_path = cache / "tokenizer.json"
    if tok_path.exists():
        tokenizer = Tokenizer.from_file(str(tok_path))
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=not quiet)
        tokenizer.train_from_iterator(texts["train"], trainer=trainer)
        tokenizer.save(str(tok_path) + ".tmp")
        os.replace(str(tok_path) + ".tmp", tok_path)
    eot = tokenizer.token_to_id("<|endoftext|>")

    tokens = {}
    for s in SPLITS:
        path = cache / f"{s}.npy"
        if path.exists():
            tokens[s] = np.load(path)
            continue
        ids = [t.ids for t in tokenizer.encode_batch(texts[s])]
        arr = np.fromiter((i for doc in ids for i in (*doc, eot)), dtype=np.uint16,
                          count=sum(len(d) + 1 for d in ids))
        np.save(str(path) + ".tmp.npy", arr)
        os.replace(str(path) + ".tmp.npy", path)
        tokens[s] = arr
    info = {"name": name, "root": str(root), "hash": corpus_hash, "licence": "PSF-2.0",
            "files": {s: len(texts[s]) for s in SPLITS},
            "bytes": {s: sum(len(t.encode()) for t in texts[s]) for s in SPLITS},
            "tokens": {s: int(tokens[s].size) for s in SPLITS},
            "vocab_size": tokenizer.get_vocab_size(), "cache": str(cache)}
    (cache / "info.json").write_text(json.dumps(info, indent=1))
    return Corpus(tokens, tokenizer, tokenizer.get_vocab_size(), info)
