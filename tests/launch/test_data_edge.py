"""Odd data: a single file, a corpus too small for the run, interrupted cache writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import launch.data as data_module
from launch.data import (
    BatchSampler,
    DataError,
    TokenSplits,
    check_training_data,
    is_validation,
    list_documents,
    prepare_corpus,
    validation_batches,
    validation_windows,
)


def expected_byte_split(stream: bytes, val_permille: int) -> tuple[bytes, bytes]:
    """The documented byte-range rule, computed independently of launch.data."""
    n = len(stream)
    target = int(Fraction(n * val_permille, 1000) + Fraction(1, 2))  # round half up
    target = min(n - 1, max(1, target))
    cut = n - target
    tail = stream[cut : n - 1]  # a separator that is the very last byte would leave validation empty
    if b"\x00" in tail:
        separator = cut + tail.index(b"\x00")
        return stream[:separator], stream[separator + 1 :]
    return stream[:cut], stream[cut:]


def old_fingerprint(root: Path, files: list[Path], val_permille: int) -> str:
    """The cache name the code before the byte-range rule gave every corpus."""
    h = hashlib.sha256(f"v1 val{val_permille}".encode())
    for path in files:
        stat = path.stat()
        h.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def names_on_each_side(val_permille: int, suffix: str) -> tuple[str, str]:
    """A file name that the hash puts in validation and one it puts in training."""
    names = [f"doc{i}{suffix}" for i in range(200)]
    return (next(n for n in names if is_validation(n, val_permille)),
            next(n for n in names if not is_validation(n, val_permille)))


def no_temp_files(cache_root: Path) -> list[Path]:
    return [p for p in cache_root.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- a single file trains


@pytest.mark.parametrize("size, val_permille", [(12_345, 50), (1_010, 50), (7, 999), (2, 1)])
def test_a_single_txt_file_is_split_by_byte_ranges(tmp_path, size, val_permille):
    # (1010, 50): 50.5 bytes rounds half up to 51; (7, 999) and (2, 1): training and validation keep >= 1 byte
    path = tmp_path / "book.txt"
    text = bytes((65 + (i * 7) % 26) for i in range(size))  # no byte 0: a plain byte cut
    path.write_bytes(text)
    splits = prepare_corpus(str(path), tmp_path / "cache", val_permille)
    train, val = expected_byte_split(text, val_permille)
    assert len(train) > 0 and len(val) > 0
    assert bytes(splits.train) == train and bytes(splits.val) == val
    assert len(splits.train) + len(splits.val) == size
    assert splits.split_mode == "bytes" and splits.num_train_files == splits.num_val_files == 1
    assert "one file" in splits.split_note and "byte ranges" in splits.split_note
    assert f"({len(val):,} bytes)" in splits.split_note
    again = prepare_corpus(str(path), tmp_path / "cache", val_permille)  # from the cache, same answer
    assert again.cache_dir == splits.cache_dir and bytes(again.val) == val and again.split_note == splits.split_note


def test_a_single_jsonl_file_is_cut_at_a_document_boundary(tmp_path):
    texts = [f"document {i}: " + "héllo wörld " * (3 + i % 5) for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stream = b"\x00".join(t.encode() for t in texts)
    splits = prepare_corpus(str(path), tmp_path / "cache", val_permille=100)
    train, val = expected_byte_split(stream, 100)
    assert bytes(splits.train) == train and bytes(splits.val) == val
    # the cut moved forward to a separator: validation is whole documents, the separator on neither side
    assert len(train) + len(val) == len(stream) - 1
    first_val = next(i for i in range(len(texts)) if b"\x00".join(t.encode() for t in texts[i:]) == val)
    assert 0 < first_val < len(texts)
    assert len(val) <= round(len(stream) * 0.1)
    assert "one file: split by byte ranges, the last 10.0% for validation" in splits.split_note


def test_a_plain_cut_when_the_tail_has_no_separator(tmp_path):
    # a separator early in the stream but none in the last 5%: the cut stays where the share puts it
    path = tmp_path / "d.txt"
    text = b"a" * 100 + b"\x00" + b"b" * 899  # 1000 bytes: the last 50 for validation
    path.write_bytes(text)
    splits = prepare_corpus(str(path), tmp_path / "cache")
    assert bytes(splits.train) == text[:950] and bytes(splits.val) == text[950:]


def test_a_folder_whose_files_all_hash_to_training_is_split_by_byte_ranges(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    names = [f"doc{i}.txt" for i in range(100) if not is_validation(f"doc{i}.txt", 50)][:3]
    for i, name in enumerate(names):
        (corpus / name).write_text(f"file {i} " * 50)
    splits = prepare_corpus(str(corpus), tmp_path / "cache")
    stream = b"\x00".join((corpus / name).read_bytes() for name in sorted(names))
    train, val = expected_byte_split(stream, 50)
    assert bytes(splits.train) == train and bytes(splits.val) == val
    assert splits.num_train_files == 3 and splits.num_val_files == 1  # the tail lies in the last file
    assert "3 files" in splits.split_note and "validation would be empty" in splits.split_note


def test_a_folder_that_splits_by_file_is_unchanged(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    names = [f"doc{i:03d}.txt" for i in range(40)]
    for i, name in enumerate(names):
        (corpus / name).write_text(f"document {i} " * 20)
    splits = prepare_corpus(str(corpus), tmp_path / "cache", val_permille=200)
    val_names = [n for n in names if is_validation(n, 200)]
    train_names = [n for n in names if not is_validation(n, 200)]
    assert val_names and train_names
    assert bytes(splits.val) == b"\x00".join((corpus / n).read_bytes() for n in val_names)
    assert bytes(splits.train) == b"\x00".join((corpus / n).read_bytes() for n in train_names)
    assert (splits.num_train_files, splits.num_val_files) == (len(train_names), len(val_names))
    assert splits.split_mode == "file"
    assert f"split by file (a hash of each path): {len(train_names)} training files" in splits.split_note
    assert f"{len(val_names)} validation files" in splits.split_note
    # the cache name is the one the code before the byte-range rule used: existing caches stay valid
    root, files = list_documents(str(corpus))
    assert splits.cache_dir.name == old_fingerprint(root, files, 200)


def test_the_byte_range_rule_has_its_own_cache(tmp_path):
    # a cache the old code wrote for a single file (everything in validation) is not reused
    path = tmp_path / "one.txt"
    path.write_text("some text " * 100)
    root, files = list_documents(str(path))
    splits = prepare_corpus(str(path), tmp_path / "cache")
    assert splits.cache_dir.name != old_fingerprint(root, files, 50)
    stale = tmp_path / "cache" / old_fingerprint(root, files, 50)
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"")
    (stale / "val.bin").write_bytes(path.read_bytes())
    assert len(prepare_corpus(str(path), tmp_path / "cache").train) > 0


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"x", "only 1 byte")])
def test_a_file_too_small_to_split_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "tiny.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        prepare_corpus(str(path), tmp_path / "cache")
    assert not no_temp_files(tmp_path / "cache")


# ----------------------------------------------------------------------------- the checks before the ranks start


def splits_of(num_train: int, num_val: int) -> TokenSplits:
    tokens = (np.arange(max(num_train, num_val)) % 251).astype(np.uint8)
    return TokenSplits(tokens[:num_train], tokens[:num_val], Path("cache"), 1, 1, "one file: split by byte ranges",
                       "'corpus.txt'")


def test_check_training_data_rejects_a_training_split_shorter_than_two_windows():
    with pytest.raises(DataError) as err:
        check_training_data(splits_of(17, 1000), seq_len=16, micro_batch_size=4, world_size=1)
    message = str(err.value)
    assert "training split of 'corpus.txt' has 17 tokens" in message and "at least 18" in message
    assert "train.seq_len=16" in message and "\n" not in message


def test_check_training_data_rejects_a_validation_split_shorter_than_one_window():
    with pytest.raises(DataError) as err:
        check_training_data(splits_of(1000, 16), seq_len=16, micro_batch_size=4, world_size=1)
    message = str(err.value)
    assert "validation split of 'corpus.txt' has 16 tokens" in message and "nothing to evaluate" in message
    assert "17 tokens is needed" in message and "\n" not in message


def test_without_evaluation_only_the_training_split_is_checked():
    check_training_data(splits_of(18, 1), seq_len=16, micro_batch_size=4, world_size=4, validate=False)


def _run_validation_everywhere(splits, seq_len, batch_size, world_size, val_tokens):
    """Every rank's batches: each window exactly once over the ranks, and as many forwards on each."""
    windows = validation_windows(splits.val, seq_len, val_tokens)
    per_rank = [list(validation_batches(splits.val, windows, batch_size, rank, world_size)) for rank in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1  # expert-parallel ranks exchange in every forward
    ids = sorted(int(i) for batches in per_rank for _, _, ids in batches for i in ids if i >= 0)
    assert ids == list(range(windows.count))
    for batches in per_rank:
        for x, y, _ in batches:
            assert x.shape == y.shape and x.shape[1] == seq_len
    return windows


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_corpus_just_large_enough_passes_and_then_trains_and_evaluates(world_size):
    seq_len, batch_size = 16, 4
    splits = splits_of(seq_len + 2, seq_len + 1)
    check_training_data(splits, seq_len, batch_size, world_size)
    for rank in range(world_size):
        x, y = next(BatchSampler(splits.train, seq_len, batch_size, rank, world_size, seed=1))
        assert x.shape == y.shape == (batch_size, seq_len)
    assert _run_validation_everywhere(splits, seq_len, batch_size, world_size, 1000).count == 1


def test_whatever_passes_the_check_works_in_every_rank():
    seq_len, batch_size = 5, 2
    for world_size in (1, 2, 3, 4):
        for num_train in range(seq_len, seq_len + 4):
            for num_val in range(1, world_size * seq_len + 4):
                splits = splits_of(num_train, num_val)
                try:
                    check_training_data(splits, seq_len, batch_size, world_size)
                except DataError:
                    ok = False
                else:
                    ok = True
                works = num_train >= seq_len + 2
                if works:
                    for rank in range(world_size):
                        next(BatchSampler(splits.train, seq_len, batch_size, rank, world_size))
                try:
                    _run_validation_everywhere(splits, seq_len, batch_size, world_size, 3 * seq_len)
                except DataError:
                    works = False
                assert ok == works, (world_size, num_train, num_val)


def test_a_real_single_file_just_large_enough(tmp_path):
    # 34 bytes at 50%: 17 for training (>= 8 + 2) and 17 >= 8 + 1 for validation
    path = tmp_path / "small.txt"
    path.write_bytes(b"abcdefghijklmnopqrstuvwxyz01234567")
    splits = prepare_corpus(str(path), tmp_path / "cache", val_permille=500)
    assert (len(splits.train), len(splits.val)) == (17, 17)
    check_training_data(splits, seq_len=8, micro_batch_size=2, world_size=3)
    assert _run_validation_everywhere(splits, 8, 2, 3, 1000).count == 2  # (17 - 1) // 8 windows fit
    with pytest.raises(DataError, match="validation split of .*small.txt has 8 tokens, nothing to evaluate"):
        check_training_data(TokenSplits(splits.train, splits.val[:8], splits.cache_dir, 1, 1, "", str(path)), seq_len=8,
                            micro_batch_size=2, world_size=3)


# ----------------------------------------------------------------------------- interrupted cache writes


def _corpus_with_a_bad_line(tmp_path: Path, split_by: str) -> Path:
    bad = "\n".join(json.dumps({"text": f"good line {i}"}) for i in range(50)) + "\n{not json\n"
    good = "\n".join(json.dumps({"text": f"other line {i}"}) for i in range(50)) + "\n"
    if split_by == "bytes":
        path = tmp_path / "one.jsonl"
        path.write_text(bad)
        return path
    corpus = tmp_path / "c"
    corpus.mkdir()
    val_name, train_name = names_on_each_side(500, ".jsonl")
    (corpus / val_name).write_text(good)  # validation is written first: a finished file, then the failure
    (corpus / train_name).write_text(bad)
    return corpus


@pytest.mark.parametrize("split_by", ["bytes", "file"])
def test_a_malformed_line_mid_write_leaves_no_temp_file(tmp_path, split_by):
    source = _corpus_with_a_bad_line(tmp_path, split_by)
    with pytest.raises(DataError, match=r":51: expected a JSON object"):
        prepare_corpus(str(source), tmp_path / "cache", val_permille=500)
    assert (tmp_path / "cache").exists() and not no_temp_files(tmp_path / "cache")


@pytest.mark.parametrize("split_by", ["bytes", "file"])
def test_an_interrupt_mid_write_leaves_no_temp_file(tmp_path, monkeypatch, split_by):
    source = _corpus_with_a_bad_line(tmp_path, split_by)
    for path in ([source] if source.is_file() else source.iterdir()):
        path.write_text(json.dumps({"text": "fine"}) + "\n")
    reads = []

    def interrupted(path):
        reads.append(path)
        if len(reads) == 2 or split_by == "bytes":
            raise KeyboardInterrupt
        return b"fine"

    monkeypatch.setattr(data_module, "_read_document", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(str(source), tmp_path / "cache", val_permille=500)
    assert reads and not no_temp_files(tmp_path / "cache")


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("text " * 200)
    splits = prepare_corpus(str(path), tmp_path / "cache")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = splits.cache_dir / f"train.bin.tmp{dead.pid}"
        live = splits.cache_dir / f"val.bin.tmp{alive.pid}"
        mine = splits.cache_dir / f"train.bin.tmp{data_module.os.getpid()}"
        unrelated = splits.cache_dir / "notes.tmpx"
        for p in (stale, live, mine, unrelated):
            p.write_bytes(b"partial")
        again = prepare_corpus(str(path), tmp_path / "cache")
        assert again.cache_dir == splits.cache_dir
        assert not stale.exists()
        assert live.exists() and mine.exists() and unrelated.exists()
        assert bytes(again.train) == bytes(splits.train)
    finally:
        alive.kill()
        alive.wait()
