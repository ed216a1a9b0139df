"""Text data that ships with every Python, so the NLP examples run offline.

``PydocTextDataModule``: causal language modelling on ``pydoc_data.topics`` (the text behind
``help("topics")``, ~116k tokens) or, with ``corpus="stdlib_docstrings"``, on every docstring
of the standard library (~4x larger, for longer benchmark runs). A byte-level BPE tokenizer is
trained on the training part only and cached on disk, so it is trained once per text.

``DocstringDataModule``: text classification: which standard-library package does a
docstring come from? Tokenised with the bundled MiniLM tokenizer.

Both are used by the yaml configs beside this file, e.g. from the repository root::

    lit-efficient fit --config examples/nlp/lm_pydoc.yaml
    lit-efficient fit --config examples/nlp/minilm_docstrings.yaml
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import tempfile
import warnings
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from examples.nlp.common import minilm_path

# Bump when the tokenizer recipe changes, so stale cached tokenizers are not reused.
_TOKENIZER_RECIPE = "bytelevel-bpe-v1"


# --------------------------------------------------------------------------------------------
# Corpora (pure functions, deterministic for a given Python installation)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def pydoc_text() -> str:
    """``pydoc_data.topics.topics`` values joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_skipped_dir(name: str) -> bool:
    # test suites are large, repetitive and not documentation; site-packages is not stdlib
    return (
        name in ("site-packages", "dist-packages", "__pycache__", "tests", "idle_test")
        or name.startswith("test")
    )


def _python_files(root: str) -> list[str]:
    """All ``.py`` files under ``root`` (or ``root + ".py"``), in a sorted, stable order."""
    if os.path.isfile(root + ".py"):
        return [root + ".py"]
    out: list[str] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_skipped_dir(d))
        out.extend(os.path.join(here, f) for f in sorted(files) if f.endswith(".py"))
    return out


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_BLOCK_ITEMS = (ast.stmt, ast.excepthandler) + ((ast.match_case,) if hasattr(ast, "match_case") else ())


def _definition_docstrings(node: ast.AST, out: list[str]) -> None:
    """Docstrings of the classes/functions under ``node`` in source order (pre-order). Only
    statement blocks are descended (a definition can only sit in one), which is ~10x faster
    than ``ast.walk`` over every expression node."""
    for _, value in ast.iter_fields(node):
        if not (isinstance(value, list) and value and isinstance(value[0], _BLOCK_ITEMS)):
            continue
        for child in value:
            if isinstance(child, _DEFS):
                doc = ast.get_docstring(child)
                if doc and doc.strip():
                    out.append(doc.strip())
            _definition_docstrings(child, out)


def _docstrings(path: str, include_module: bool) -> list[str]:
    """Docstrings of a source file, read with ``ast``: nothing is imported, so no module's
    import-time side effects run; files that do not decode or parse are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out: list[str] = []
    if include_module:
        doc = ast.get_docstring(tree)
        if doc and doc.strip():
            out.append(doc.strip())
    _definition_docstrings(tree, out)
    return out


@functools.lru_cache(maxsize=None)
def stdlib_docstrings_text() -> str:
    """Every module, class and function docstring of the standard library (test suites
    excluded), files in sorted order, joined with blank lines (~1.8 MB on CPython 3.11)."""
    parts: list[str] = []
    for path in _python_files(_stdlib_dir()):
        parts.extend(_docstrings(path, include_module=True))
    return "\n\n".join(parts)


def corpus_text(corpus: str) -> str:
    if corpus == "pydoc":
        return pydoc_text()
    if corpus == "stdlib_docstrings":
        return stdlib_docstrings_text()
    raise ValueError(f"`corpus` must be 'pydoc' or 'stdlib_docstrings', got {corpus!r}.")


def default_cache_dir() -> str:
    return os.environ.get(
        "LIT_EFFICIENT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lit_efficient")
    )


def train_bpe_tokenizer(text: str, vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) trained on ``text``; every byte is in the alphabet, so
    any string round-trips through encode/decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def cached_bpe_tokenizer(text: str, vocab_size: int, cache_dir: Optional[str] = None) -> Any:
    """``train_bpe_tokenizer`` keyed on disk by a hash of (recipe, vocab_size, text)."""
    from tokenizers import Tokenizer

    key = hashlib.sha256(f"{_TOKENIZER_RECIPE}\0{vocab_size}\0".encode() + text.encode()).hexdigest()
    folder = os.path.join(cache_dir or default_cache_dir(), "tokenizers")
    path = os.path.join(folder, f"bpe-{vocab_size}-{key[:16]}.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    tok = train_bpe_tokenizer(text, vocab_size)
    os.makedirs(folder, exist_ok=True)
    # write-then-rename: concurrent processes (DDP ranks, parallel tests) never read half a file
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


# --------------------------------------------------------------------------------------------
# Causal LM data
# --------------------------------------------------------------------------------------------


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``seq_len`` tokens; the remainder at the end is dropped.
    Labels equal the inputs: the model shifts them by one."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        n = ids.numel() // seq_len
        self.blocks = ids[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class PydocTextDataModule(LightningDataModule):
    """Causal-LM batches ``{"input_ids": LongTensor[B, seq_len]}`` from text bundled with Python.

    The text is split by character position: the first ``1 - val_fraction`` is training text
    (the tokenizer is trained on it alone), the rest validation, so no validation text leaks
    into the tokenizer or the training blocks.

    Args:
        corpus: ``"pydoc"`` (``pydoc_data.topics``, the standard LM task) or ``"stdlib_docstrings"``
            (all standard-library docstrings, ~4x larger, for longer runs).
        vocab_size: BPE vocabulary size (>= 256, the bytes; default 2048). Must not exceed the model's.
        seq_len: tokens per sequence (default 128).
        batch_size: sequences per batch (default 16).
        val_fraction: trailing fraction of the text held out (default 0.1, in (0, 1)).
        seed: seed of the training shuffle generator (default 0).
        num_workers: DataLoader workers (default 0; the data is an in-memory tensor).
        drop_last: drop the last incomplete training batch so every step sees ``batch_size``
            sequences (default True).
        cache_dir: where the trained tokenizer is cached (default ``$LIT_EFFICIENT_CACHE`` or
            ``~/.cache/lit_efficient``).
    """

    def __init__(
        self,
        corpus: Literal["pydoc", "stdlib_docstrings"] = "pydoc",
        vocab_size: int = 2048,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if corpus not in ("pydoc", "stdlib_docstrings"):
            raise ValueError(f"`corpus` must be 'pydoc' or 'stdlib_docstrings', got {corpus!r}.")
        if vocab_size < 256:
            raise ValueError(f"`vocab_size` must be >= 256 (the byte alphabet), got {vocab_size}.")
        if seq_len < 2:
            raise ValueError(f"`seq_len` must be >= 2, got {seq_len}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self._vocab_size = vocab_size
        self._tokenizer: Any = None
        self.train_set: Optional[TokenBlocks] = None
        self.val_set: Optional[TokenBlocks] = None

    # text and tokenizer -------------------------------------------------------------------

    def split_text(self) -> tuple[str, str]:
        """(train text, validation text), split by character position."""
        text = corpus_text(self.corpus)
        cut = int(len(text) * (1.0 - self.val_fraction))
        return text[:cut], text[cut:]

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` (trained on the training text on first use, then cached)."""
        if self._tokenizer is None:
            self._tokenizer = cached_bpe_tokenizer(self.split_text()[0], self._vocab_size, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def decode(self, ids: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)

    # Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        # runs on one process per node: train and cache the tokenizer once before the ranks load it
        _ = self.tokenizer

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train_text, val_text = self.split_text()
        self.train_ids = self.encode(train_text)
        self.val_ids = self.encode(val_text)
        self.train_set = TokenBlocks(self.train_ids, self.seq_len)
        self.val_set = TokenBlocks(self.val_ids, self.seq_len)
        if len(self.val_set) == 0:
            raise ValueError(
                f"The validation text has {self.val_ids.numel()} tokens, fewer than one "
                f"sequence of `seq_len`={self.seq_len}; raise `val_fraction` or lower `seq_len`."
            )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=self.drop_last,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


# --------------------------------------------------------------------------------------------
# Docstring classification data
# --------------------------------------------------------------------------------------------

# Eight packages with >= 99 distinct docstrings each on CPython 3.10-3.13 (capped at 90 per class).
# http, urllib and email share a vocabulary (headers, messages, requests) and asyncio/logging/unittest
# share one of handlers and runners, so the task is learnable without being solved by a single keyword.
DEFAULT_MODULES = ["asyncio", "email", "http", "importlib", "logging", "unittest", "urllib", "xml"]


def collect_docstrings(modules: list[str], max_words: int = 64) -> list[tuple[str, int]]:
    """(text, label) for every function, method and class docstring in each module's source,
    truncated to its first ``max_words`` words. Label = index of the module in ``modules``.
    Texts that occur more than once (inherited boilerplate, or the same text in two modules)
    are dropped: they would leak between train and validation or be unlearnable."""
    return list(_collect_docstrings(tuple(modules), max_words))


@functools.lru_cache(maxsize=8)
def _collect_docstrings(modules: tuple[str, ...], max_words: int) -> tuple[tuple[str, int], ...]:
    # cached: parsing the sources dominates setup, and a datamodule may be built many times
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(modules):
        root = os.path.join(_stdlib_dir(), *name.split("."))
        files = _python_files(root)
        if not files:
            raise ValueError(f"`modules`: no standard-library source found for {name!r}.")
        for path in files:
            for doc in _docstrings(path, include_module=False):
                samples.append((" ".join(doc.split()[:max_words]), label))
    counts: dict[str, int] = {}
    for text, _ in samples:
        counts[text] = counts.get(text, 0) + 1
    return tuple((t, y) for t, y in samples if counts[t] == 1)


class _Encoded(Dataset):
    def __init__(self, ids: list[list[int]], labels: list[int]) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def pad_collate(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (not to ``max_length``): short docstrings cost less."""
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
    labels = torch.tensor([b["labels"] for b in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class DocstringDataModule(LightningDataModule):
    """Classify standard-library docstrings by the package they come from.

    Samples are read from source with ``ast`` (no imports), in sorted file order; each class is
    subsampled to at most ``max_per_class`` (seeded) so classes are balanced, then a seeded
    permutation puts ``val_fraction`` of the samples in validation. Batches are
    ``{"input_ids", "attention_mask", "labels"}`` from the bundled MiniLM tokenizer.

    Args:
        modules: standard-library packages/modules; the class index is the position in this list.
        max_words: words kept from the start of each docstring (default 64).
        max_length: tokenizer truncation length (default 64, at most 512).
        max_per_class: cap on samples per class, for balance (default 90: every default module
            has more; ``None`` keeps all, unbalanced: asyncio has 3x urllib's count).
        batch_size: default 32.
        val_fraction: default 0.2, in (0, 1).
        seed: seed of the subsampling, the split and the training shuffle (default 0).
        num_workers: DataLoader workers (default 0).
    """

    def __init__(
        self,
        modules: Optional[list[str]] = None,
        max_words: int = 64,
        max_length: int = 64,
        max_per_class: Optional[int] = 90,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        modules = list(DEFAULT_MODULES if modules is None else modules)
        if len(modules) < 2 or len(set(modules)) != len(modules):
            raise ValueError(f"`modules` must list at least 2 distinct modules, got {modules}.")
        if not 1 <= max_length <= 512:
            raise ValueError(f"`max_length` must be in [1, 512], got {max_length}.")
        if max_words < 1:
            raise ValueError(f"`max_words` must be >= 1, got {max_words}.")
        if max_per_class is not None and max_per_class < 2:
            raise ValueError(f"`max_per_class` must be >= 2 or None, got {max_per_class}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.classes = modules
        self.max_words = max_words
        self.max_length = max_length
        self.max_per_class = max_per_class
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._tokenizer: Any = None
        self.train_set: Optional[_Encoded] = None
        self.val_set: Optional[_Encoded] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        return self._tokenizer

    def samples(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(train, validation) lists of (text, label); deterministic for a given Python and seed."""
        gen = torch.Generator().manual_seed(self.seed)
        picked: list[tuple[str, int]] = []
        everything = collect_docstrings(self.classes, self.max_words)
        for label in range(self.num_classes):
            mine = [s for s in everything if s[1] == label]
            if self.max_per_class is not None and len(mine) > self.max_per_class:
                keep = sorted(torch.randperm(len(mine), generator=gen)[: self.max_per_class].tolist())
                mine = [mine[i] for i in keep]
            picked.extend(mine)
        order = torch.randperm(len(picked), generator=gen).tolist()
        n_val = max(1, int(round(len(picked) * self.val_fraction)))
        return [picked[i] for i in order[n_val:]], [picked[i] for i in order[:n_val]]

    def class_counts(self) -> dict[str, tuple[int, int]]:
        """{module: (train count, validation count)}, to inspect the balance."""
        train, val = self.samples()
        return {
            name: (sum(y == k for _, y in train), sum(y == k for _, y in val))
            for k, name in enumerate(self.classes)
        }

    def _encode(self, samples: list[tuple[str, int]]) -> _Encoded:
        enc = self.tokenizer([t for t, _ in samples], truncation=True, max_length=self.max_length)
        return _Encoded(list(enc["input_ids"]), [y for _, y in samples])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        train, val = self.samples()
        self.train_set, self.val_set = self._encode(train), self._encode(val)

    def _collate(self) -> Any:
        return functools.partial(pad_collate, pad_id=self.tokenizer.pad_token_id or 0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self._collate(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set, batch_size=self.batch_size, collate_fn=self._collate(), num_workers=self.num_workers
        )
