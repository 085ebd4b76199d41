"""Training data: a byte-level corpus split by file, tokenised once into a cached memmap, and a
deterministic sampler that gives each data-parallel rank different batches.

The built-in corpus is the running interpreter's own standard library ``.py`` sources: real text
that is on every machine, so the default run needs no download. ``--data PATH`` takes a ``.txt`` or
``.jsonl`` file (one JSON object per line with a ``"text"`` field) or a folder of them.

Tokens are bytes (vocabulary 256); documents are separated by byte 0. Two split rules, each the
same on every machine:

- **by file** (the rule whenever it leaves text on both sides): a file goes to validation when
  ``sha1(its relative path) % 1000 < val_permille``, so the split does not move when files are
  added or removed;
- **by byte ranges** (a single file, or a corpus whose files all hash to one side): the files'
  non-empty documents are joined in path order by byte 0 into one stream of ``n`` bytes; the last
  ``target = clamp(round_half_up(n * val_permille / 1000), 1, n - 1)`` bytes go to validation. The
  cut ``n - target`` moves forward to the first byte 0 at or after it that is not the stream's last
  byte (that separator belongs to neither side); with none there it is a plain byte cut. See
  :func:`byte_range_split`.

:func:`check_training_data` then says, once and before any rank starts, whether the splits are
large enough for a run's sequence length, ranks and validation.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
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
SPLIT_BY_FILE, SPLIT_BY_BYTES = "file", "bytes"
_TEMP_NAME = re.compile(r"\.tmp(\d+)$")  # what _temp_path appends: ".tmp<pid>"
_COPY_CHUNK = 1 << 24


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


def _fingerprint(root: Path, files: list[Path], val_permille: int, split_mode: str = SPLIT_BY_FILE) -> str:
    # The by-file rule hashes exactly what it always did, so existing caches of corpora that split by
    # file (the built-in one included) stay valid; the byte-range rule gets its own caches.
    tag = f"v{CACHE_VERSION} val{val_permille}" + ("" if split_mode == SPLIT_BY_FILE else f" split={split_mode}")
    h = hashlib.sha256(tag.encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _temp_path(path: Path) -> Path:
    return path.with_suffix(path.suffix + f".tmp{os.getpid()}")


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def remove_stale_temp_files(cache_dir: Path) -> list[Path]:
    """Delete ``*.tmp<pid>`` files in ``cache_dir`` whose writer is no longer running (a writer
    killed by SIGKILL cannot clean up after itself); returns what was deleted. A file of a running
    process (this one included: another rank, or a write in progress) is never touched."""
    if os.name != "posix" or not cache_dir.is_dir():
        return []  # os.kill(pid, 0) is a liveness probe only on POSIX
    removed = []
    for path in cache_dir.iterdir():
        match = _TEMP_NAME.search(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group(1))
        if pid <= 0 or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, OverflowError):  # no such process (or a number no pid can be)
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        except OSError:  # PermissionError: alive, someone else's
            continue
    return removed


def _write_joined(out, documents: Iterable[bytes]) -> int:
    count = 0
    for i, doc in enumerate(documents):
        if i:
            out.write(DOC_SEPARATOR)
            count += 1
        out.write(doc)
        count += len(doc)
    return count


def _write_tokens(path: Path, documents: Iterable[bytes]) -> int:
    """Write the byte tokens of ``documents`` to ``path`` (temp file, then rename); returns the
    count. On any exception (a malformed document, KeyboardInterrupt) the temp file is removed."""
    tmp = _temp_path(path)
    try:
        with tmp.open("wb") as out:
            count = _write_joined(out, documents)
        os.replace(tmp, path)
    except BaseException:
        _unlink_all([tmp])
        raise
    return count


def byte_range_split(stream, val_permille: int) -> tuple[int, int]:
    """``(train_end, val_start)`` of the byte-range rule for a stream of ``n >= 2`` bytes (``bytes``
    or an ``mmap``): training is ``stream[:train_end]``, validation ``stream[val_start:]``, both
    non-empty. Integer arithmetic only, so every machine cuts in the same place."""
    n = len(stream)
    if n < 2:
        raise ValueError(f"a byte-range split needs at least 2 bytes, got {n}")
    target = min(n - 1, max(1, (n * val_permille + 500) // 1000))  # round half up, then 1..n-1
    cut = n - target
    separator = stream.find(DOC_SEPARATOR, cut, n - 1)  # never the last byte: validation stays non-empty
    return (separator, separator + 1) if separator >= 0 else (cut, cut)


def _write_byte_split(train_path: Path, val_path: Path, meta_path: Path, files: list[Path], val_permille: int,
                      source: str) -> None:
    """Write the byte-range split of ``files`` (one stream, cut by :func:`byte_range_split`) and its
    file counts; ``meta_path`` is written last, so its presence marks a complete cache."""
    tmp_train, tmp_val, tmp_meta = _temp_path(train_path), _temp_path(val_path), _temp_path(meta_path)
    try:
        spans = []  # [start, end) of each file's bytes in the stream
        with tmp_train.open("wb") as out:
            total = 0
            for path in files:
                doc = _read_document(path)
                if doc:
                    if total:
                        out.write(DOC_SEPARATOR)
                        total += 1
                    out.write(doc)
                spans.append((total, total + len(doc)))
                total += len(doc)
        if total == 0:
            raise DataError(f"data under {source} is empty: its {len(files):,} file(s) hold no text")
        if total < 2:
            raise DataError(f"data under {source} has only {total} byte of text: too little to split into training and validation")
        with open(tmp_train, "rb") as stream_file, mmap.mmap(stream_file.fileno(), 0, access=mmap.ACCESS_READ) as stream:
            train_end, val_start = byte_range_split(stream, val_permille)
            with tmp_val.open("wb") as out:
                for offset in range(val_start, total, _COPY_CHUNK):
                    out.write(stream[offset : min(offset + _COPY_CHUNK, total)])
        os.truncate(tmp_train, train_end)
        meta = {
            "split": SPLIT_BY_BYTES,
            "bytes": total,
            "train_end": train_end,
            "val_start": val_start,
            "num_train_files": sum(1 for start, end in spans if end > start and start < train_end),
            "num_val_files": sum(1 for start, end in spans if end > start and end > val_start),
        }
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_val, val_path)
        os.replace(tmp_train, train_path)
        os.replace(tmp_meta, meta_path)
    except BaseException:
        _unlink_all([tmp_train, tmp_val, tmp_meta])
        raise


@dataclass
class TokenSplits:
    train: np.ndarray
    """uint8 memmap of the training tokens."""
    val: np.ndarray
    """uint8 memmap of the validation tokens."""
    cache_dir: Path
    num_train_files: int
    """Files with text in the training split (by byte ranges, a file may count on both sides)."""
    num_val_files: int
    """Files with text in the validation split."""
    split_note: str = ""
    """How the corpus was split, in words, for the run's log."""
    source: str = ""
    """The data the splits come from (a path, or the built-in corpus), for messages."""
    split_mode: str = SPLIT_BY_FILE
    """``"file"`` (by a hash of each file's path) or ``"bytes"`` (by byte ranges of the joined files)."""


def _describe_source(data: Optional[str], root: Path) -> str:
    return f"the built-in corpus ({str(root)!r})" if data is None else repr(str(Path(data).expanduser()))


def prepare_corpus(data: Optional[str], cache_root: str | os.PathLike, val_permille: int = 50) -> TokenSplits:
    """Tokenise the corpus once into ``cache_root/<fingerprint>/{train,val}.bin`` and memmap it.

    The fingerprint covers every file's path, size and mtime, the share held out and the split
    rule, so a changed corpus gets a new cache and an unchanged one is never re-read. Safe to call
    on every rank: the files are written under temporary names and renamed, so a reader never sees
    a partial file; a failed write removes its temporary files, and temporary files of writers that
    are no longer running are removed here.
    """
    root, files = list_documents(data)
    source = _describe_source(data, root)
    is_val = [is_validation(str(p.relative_to(root)), val_permille) for p in files]
    sizes = [p.stat().st_size for p in files]
    val_bytes = sum(size for size, v in zip(sizes, is_val) if v)
    train_bytes = sum(size for size, v in zip(sizes, is_val) if not v)
    split_mode = SPLIT_BY_FILE if val_bytes and train_bytes else SPLIT_BY_BYTES
    cache_dir = Path(cache_root) / _fingerprint(root, files, val_permille, split_mode)
    train_path, val_path, meta_path = cache_dir / "train.bin", cache_dir / "val.bin", cache_dir / "split.json"
    remove_stale_temp_files(cache_dir)
    complete = train_path.exists() and val_path.exists() and (split_mode == SPLIT_BY_FILE or meta_path.exists())
    if not complete:
        cache_dir.mkdir(parents=True, exist_ok=True)
        if split_mode == SPLIT_BY_FILE:
            _write_tokens(val_path, (_read_document(p) for p, v in zip(files, is_val) if v))
            _write_tokens(train_path, (_read_document(p) for p, v in zip(files, is_val) if not v))
        else:
            _write_byte_split(train_path, val_path, meta_path, files, val_permille, source)
    train, val = (np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8) for p in (train_path, val_path))
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"data under {source} is empty after splitting (train {len(train)} bytes, val {len(val)} bytes)")
    if split_mode == SPLIT_BY_FILE:
        num_val = sum(is_val)
        num_train = len(files) - num_val
        note = (f"split by file (a hash of each path): {num_train:,} training files ({len(train):,} bytes), "
                f"{num_val:,} validation files ({len(val):,} bytes)")
    else:
        meta = json.loads(meta_path.read_text())
        num_train, num_val = int(meta["num_train_files"]), int(meta["num_val_files"])
        if len(files) == 1:
            why = "one file"
        else:
            empty_side = "validation" if not val_bytes else "training"
            why = f"{len(files):,} files, all on one side of the split by file ({empty_side} would be empty)"
        note = (f"{why}: split by byte ranges, the last {val_permille / 10:.1f}% for validation ({len(val):,} bytes), "
                f"the rest for training ({len(train):,} bytes)")
    return TokenSplits(train, val, cache_dir, num_train, num_val, note, source, split_mode)


def check_training_data(splits: TokenSplits, seq_len: int, micro_batch_size: int, world_size: int,
                        validate: bool = True) -> None:
    """Raise :class:`DataError` (one line: the split, its size and what is needed) unless a run
    with these settings can use ``splits``: :class:`BatchSampler` needs ``seq_len + 2`` training
    tokens, and, when validation runs (``validate``; False when ``train.eval_every`` is 0),
    :func:`validation_windows` needs one window of ``seq_len + 1`` validation tokens (ranks without
    a window of their own run a padding forward, so any number of ranks can share one window).
    Meant to run once, before any rank starts; whatever passes cannot fail these checks in a rank."""
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    source = splits.source or str(splits.cache_dir)
    how = f" ({splits.split_note})" if splits.split_note else ""
    num_train = len(splits.train)
    if num_train < seq_len + 2:
        raise DataError(
            f"the training split of {source} has {num_train:,} tokens{how}; train.seq_len={seq_len} needs at least "
            f"{seq_len + 2:,} (one window of seq_len + 1 tokens and a second start): use more data or a smaller train.seq_len"
        )
    if not validate:
        return
    num_val = len(splits.val)
    if num_val < seq_len + 1:
        raise DataError(
            f"the validation split of {source} has {num_val:,} tokens{how}, nothing to evaluate: one window of "
            f"train.seq_len + 1 = {seq_len + 1:,} tokens is needed; use more data, a larger data.val_permille, "
            f"a smaller train.seq_len, or train.eval_every=0"
        )


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


VAL_TOKENS = 65_536
"""Predicted tokens every validation reads by default (``data.val_tokens``): 512 windows of 128."""


@dataclass(frozen=True)
class ValidationWindows:
    """The held-out windows every validation of a model reads: the trainer's, ``moe eval``,
    ``moe slim``, the experiments and ``moe quantize --compare`` (:func:`validation_windows`)."""

    starts: np.ndarray
    """Offset of each window of ``seq_len + 1`` tokens in the validation split, increasing."""
    seq_len: int
    """Tokens per window that are predicted (the window's first token is context only)."""
    documents: int
    """Validation documents (files) the windows touch."""
    total_documents: int
    """Documents in the validation split."""
    split_tokens: int
    """Tokens in the validation split."""

    @property
    def count(self) -> int:
        return len(self.starts)

    @property
    def tokens(self) -> int:
        """Predicted tokens over all windows."""
        return self.count * self.seq_len

    def describe(self) -> str:
        """One line for logs and tables: what the windows cover."""
        return (f"{self.tokens:,} tokens in {self.count:,} windows of {self.seq_len}, spread evenly over the whole "
                f"validation split ({self.split_tokens:,} tokens), touching {self.documents:,} of its "
                f"{self.total_documents:,} documents")


def validation_windows(tokens: np.ndarray, seq_len: int, val_tokens: int = VAL_TOKENS) -> ValidationWindows:
    """``val_tokens // seq_len`` windows (at least 1, at most as many as fit without sharing a
    predicted token) whose starts are spread evenly from the first to the last possible start of
    the validation split ``tokens``: the whole split is sampled, not its first files, and the
    windows depend on nothing but the split, ``seq_len`` and ``val_tokens`` (not on the batch
    size, the number of ranks or the command). Integer arithmetic only, so every machine and rank
    picks the same windows."""
    if seq_len < 1 or val_tokens < 1:
        raise ValueError(f"seq_len and val_tokens must be >= 1, got {seq_len} and {val_tokens}")
    size = len(tokens)
    if size < seq_len + 1:
        raise DataError(f"the validation split has {size:,} tokens: a window of seq_len + 1 = {seq_len + 1:,} is needed")
    fit = (size - 1) // seq_len  # windows that share no predicted token
    count = max(1, min(val_tokens // seq_len, fit))
    last = size - seq_len - 1  # the last possible start
    starts = (np.arange(count, dtype=np.int64) * last) // max(count - 1, 1) if count > 1 else np.zeros(1, np.int64)
    # documents: the separators split the split into documents; a window touches those it overlaps
    separators = np.flatnonzero(np.asarray(tokens) == DOC_SEPARATOR[0])
    first = np.searchsorted(separators, starts, side="right")  # document of each window's first token
    last_doc = np.searchsorted(separators, starts + seq_len, side="right")  # ... and of its last token
    # windows are ordered and overlap by at most one token: a document is counted twice only when
    # one window ends in it and the next starts in it
    documents = int((last_doc - first + 1).sum() - (first[1:] == last_doc[:-1]).sum())
    return ValidationWindows(starts, seq_len, documents, len(separators) + 1, size)


def validation_batches(tokens: np.ndarray, windows: ValidationWindows, batch_size: int, rank: int = 0,
                       world_size: int = 1):
    """``(inputs, labels, ids)`` batches of this rank's windows (dealt round-robin: window ``i`` to
    rank ``i % world_size``), ``ids`` the windows' indices. Every rank yields as many batches
    (expert parallelism exchanges tokens in every forward): a rank with one batch fewer ends with a
    padding batch of one window whose ids are ``-1``, to be run and ignored."""
    mine = list(range(rank, windows.count, world_size))
    most = -(-len(range(0, windows.count, world_size)) // batch_size)  # rank 0 has the most windows
    seq_len = windows.seq_len
    for b in range(most):
        ids = mine[b * batch_size : (b + 1) * batch_size]
        starts = [int(windows.starts[i]) for i in ids] if ids else [int(windows.starts[0])]
        batch = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        yield batch[:, :-1], batch[:, 1:], torch.tensor(ids if ids else [-1], dtype=torch.int64)
