"""Training data: a byte-level corpus split by file, tokenised once into a cached memmap, and a
deterministic sampler that gives each data-parallel rank different batches.

The built-in corpus is the running interpreter's own standard library ``.py`` sources: real text
that is on every machine, so the default run needs no download. ``--data PATH`` takes a ``.txt`` or
``.jsonl`` file (one JSON object per line with a ``"text"`` field) or a folder of them.

Tokens are bytes (vocabulary 256); documents are separated by byte 0. A file goes to validation
when ``sha1(its relative path) % 1000 < val_permille``, so the split is the same on every machine
and does not move when files are added or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from moe.errors import UserError

BYTE_VOCAB = 256
DOC_SEPARATOR = b"\x00"
CACHE_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl")


class DataError(UserError):
    """A data source the user named cannot be used (missing, empty, malformed)."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_documents(data: Optional[str]) -> tuple[Path, list[Path]]:
    """(root, files): the standard library's ``.py`` files, or the user's ``.txt``/``.jsonl`` files."""
    if data is None:
        root = stdlib_root()
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise DataError(f"data path {str(root)!r} does not exist")
        if root.is_file():
            if root.suffix not in TEXT_SUFFIXES:
                raise DataError(f"data file {str(root)!r} is not .txt or .jsonl")
            files, root = [root], root.parent
        else:
            files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no {'.py' if data is None else '.txt or .jsonl'} files under {str(root)!r}")
    return root, files


def _read_document(path: Path) -> bytes:
    if path.suffix != ".jsonl":
        return path.read_bytes()
    texts = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"].encode("utf-8"))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise DataError(f"{path}:{number}: expected a JSON object with a string \"text\" field ({err})") from None
    return DOC_SEPARATOR.join(texts)


def is_validation(relative_path: str, val_permille: int) -> bool:
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < val_permille


def _fingerprint(root: Path, files: list[Path], val_permille: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} val{val_permille}".encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _write_tokens(path: Path, documents: Iterable[bytes]) -> int:
    """Write the byte tokens of ``documents`` to ``path`` (temp file, then rename); returns the count."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    count = 0
    with tmp.open("wb") as out:
        for i, doc in enumerate(documents):
            if i:
                out.write(DOC_SEPARATOR)
                count += 1
            out.write(doc)
            count += len(doc)
    os.replace(tmp, path)
    return count


@dataclass
class TokenSplits:
    train: np.ndarray
    """uint8 memmap of the training tokens."""
    val: np.ndarray
    """uint8 memmap of the validation tokens."""
    cache_dir: Path
    num_train_files: int
    num_val_files: int


def prepare_corpus(data: Optional[str], cache_root: str | os.PathLike, val_permille: int = 50) -> TokenSplits:
    """Tokenise the corpus once into ``cache_root/<fingerprint>/{train,val}.bin`` and memmap it.

    The fingerprint covers every file's path, size and mtime and the split, so a changed corpus
    gets a new cache and an unchanged one is never re-read. Safe to call on every rank: the files
    are written under temporary names and renamed, so a reader never sees a partial file.
    """
    root, files = list_documents(data)
    cache_dir = Path(cache_root) / _fingerprint(root, files, val_permille)
    train_path, val_path = cache_dir / "train.bin", cache_dir / "val.bin"
    is_val = [is_validation(str(p.relative_to(root)), val_permille) for p in files]
    if not (train_path.exists() and val_path.exists()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        val_files = [p for p, v in zip(files, is_val) if v]
        train_files = [p for p, v in zip(files, is_val) if not v]
        if not val_files:  # a tiny corpus: hold out its last file
            val_files, train_files = train_files[-1:], train_files[:-1]
        _write_tokens(val_path, (_read_document(p) for p in val_files))
        _write_tokens(train_path, (_read_document(p) for p in train_files))
    train, val = (np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8) for p in (train_path, val_path))
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"data under {str(root)!r} is empty after splitting (train {len(train)} bytes, val {len(val)} bytes)")
    n_val = max(1, sum(is_val))
    return TokenSplits(train, val, cache_dir, len(files) - n_val, n_val)


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens, deterministic in (seed, step, rank).

    Step ``n`` draws ``world_size * batch_size`` window starts from a generator seeded by
    ``(seed, n)``; rank r takes its own ``batch_size`` of them, so ranks never share a batch and a
    resumed run that restores ``step`` continues with exactly the batches it would have seen.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if len(tokens) < seq_len + 2:
            raise DataError(f"the training split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.world_size * self.batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in mine]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.seed = int(state["step"]), int(state["seed"])


def validation_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1):
    """Fixed, non-overlapping windows from the start of the validation split, dealt round-robin to
    ranks, the same number to each: the same windows every evaluation, so validation losses are
    comparable across steps."""
    num_windows = min((len(tokens) - 1) // seq_len, max_batches * batch_size * world_size)
    num_windows -= num_windows % world_size  # every rank runs as many forwards (expert parallelism exchanges in each)
    mine = list(range(rank, num_windows, world_size))
    for i in range(0, len(mine), batch_size):
        starts = [w * seq_len for w in mine[i : i + batch_size]]
        windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        yield windows[:, :-1], windows[:, 1:]
