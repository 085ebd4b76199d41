"""Corpus preparation, the deterministic split and the per-rank sampler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from launch.data import (
    BatchSampler,
    DataError,
    is_validation,
    list_documents,
    prepare_corpus,
    validation_batches,
    validation_windows,
)


def _write_corpus(root, n=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"document {i} " * 20)
    return root


def test_builtin_corpus_is_the_stdlib_and_split_is_deterministic(tmp_path):
    root, files = list_documents(None)
    assert any(p.name == "os.py" for p in files) and len(files) > 500
    splits = prepare_corpus(None, tmp_path / "cache")
    assert len(splits.train) > 5_000_000 and len(splits.val) > 100_000
    assert 0.01 < splits.num_val_files / (splits.num_train_files + splits.num_val_files) < 0.1
    again = prepare_corpus(None, tmp_path / "cache")
    assert again.cache_dir == splits.cache_dir
    assert np.array_equal(again.val[:1000], splits.val[:1000])


def test_split_by_file_hash_is_stable_and_disjoint(tmp_path):
    corpus = _write_corpus(tmp_path / "c")
    splits = prepare_corpus(str(corpus), tmp_path / "cache", val_permille=200)
    val_names = [f"doc{i:03d}.txt" for i in range(40) if is_validation(f"doc{i:03d}.txt", 200)]
    assert 0 < len(val_names) < 40 and splits.num_val_files == len(val_names)
    val_text = bytes(splits.val).decode()
    train_text = bytes(splits.train).decode()
    for i in range(40):
        marker = f"document {i} "  # the trailing space keeps "document 1 " out of "document 10 "
        assert (marker in val_text) == (f"doc{i:03d}.txt" in val_names)
        assert (marker in train_text) != (marker in val_text)  # every file on exactly one side
    # the rule itself: the first 8 bytes of sha1(path), big-endian, modulo 1000, below the threshold
    import hashlib
    for name in ("a/b.py", "os.py", "x/y/z.txt"):
        bucket = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") % 1000
        assert is_validation(name, bucket + 1) and not is_validation(name, bucket)


def test_cache_is_reused_until_the_corpus_changes(tmp_path):
    corpus = _write_corpus(tmp_path / "c", n=10)
    first = prepare_corpus(str(corpus), tmp_path / "cache")
    stamp = os.stat(first.cache_dir / "train.bin").st_mtime_ns
    assert prepare_corpus(str(corpus), tmp_path / "cache").cache_dir == first.cache_dir
    assert os.stat(first.cache_dir / "train.bin").st_mtime_ns == stamp  # not rewritten
    (corpus / "new.txt").write_text("a new document")
    assert prepare_corpus(str(corpus), tmp_path / "cache").cache_dir != first.cache_dir


def test_jsonl_documents_and_single_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} héllo"}) for i in range(3)) + "\n")
    root, files = list_documents(str(path))
    assert files == [path]
    other = tmp_path / "e.txt"
    other.write_text("x" * 100)
    splits = prepare_corpus(str(tmp_path), tmp_path / "cache")
    combined = bytes(splits.train) + bytes(splits.val)
    assert "héllo".encode() in combined and b"\x00" in combined


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no .txt or .jsonl files"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text(""), (p / "b.txt").write_text("")), "is empty"),
        (lambda p: (p.mkdir(), (p / "a.jsonl").write_text('{"body": 1}\n')), 'a.jsonl:1: expected a JSON object'),
    ],
)
def test_bad_data_paths_give_one_clear_error(tmp_path, setup, message):
    target = tmp_path / "data"
    setup(target)
    with pytest.raises(DataError, match=message):
        prepare_corpus(str(target), tmp_path / "cache")


def test_sampler_is_deterministic_per_rank_and_resumes():
    tokens = np.arange(10_000, dtype=np.int64) % 251
    tokens = tokens.astype(np.uint8)
    r0 = BatchSampler(tokens, seq_len=16, batch_size=4, rank=0, world_size=2, seed=3)
    r1 = BatchSampler(tokens, seq_len=16, batch_size=4, rank=1, world_size=2, seed=3)
    x0, y0 = next(r0)
    x1, _ = next(r1)
    assert x0.shape == (4, 16) and x0.dtype == torch.int64
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # labels are the next tokens
    assert not torch.equal(x0, x1)  # ranks see different batches
    for _ in range(4):
        next(r0)
    state = r0.state_dict()
    expected = next(r0)
    resumed = BatchSampler(tokens, seq_len=16, batch_size=4, rank=0, world_size=2, seed=0)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(DataError, match="fewer than one sequence"):
        BatchSampler(tokens[:10], seq_len=16, batch_size=1)


def test_validation_windows_are_fixed_and_split_over_ranks():
    tokens = (np.arange(1000) % 200).astype(np.uint8)
    windows = validation_windows(tokens, 10, val_tokens=400)
    whole = torch.cat([x for x, _, _ in validation_batches(tokens, windows, 4)])
    assert whole.shape[0] == windows.count == 40
    per_rank = [list(validation_batches(tokens, windows, 4, rank=r, world_size=3)) for r in range(3)]
    # 40 windows over 3 ranks: 14, 13, 13, in 4, 4, 4 batches (every rank runs as many forwards)
    assert [len(b) for b in per_rank] == [4, 4, 4]
    assert [sum(int((ids >= 0).sum()) for _, _, ids in b) for b in per_rank] == [14, 13, 13]
    by_id = {int(i): x[j] for b in per_rank for x, _, ids in b for j, i in enumerate(ids) if i >= 0}
    assert torch.equal(torch.stack([by_id[i] for i in range(40)]), whole)
    # a rank with one batch fewer ends with a padding batch of one window, ids -1
    per_rank = [list(validation_batches(tokens, windows, 13, rank=r, world_size=3)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2] and per_rank[1][-1][2].tolist() == [-1]


def test_validation_windows_cover_the_whole_split_evenly_whatever_reads_them():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=50_000).astype(np.uint8)
    separators = np.sort(rng.choice(np.arange(1, 49_999), size=300, replace=False))
    tokens[separators] = 0
    windows = validation_windows(tokens, 64, val_tokens=64 * 100)
    starts = windows.starts.tolist()
    assert len(starts) == 100 and starts[0] == 0 and starts[-1] == len(tokens) - 65  # first to last possible start
    gaps = np.diff(starts)
    assert gaps.min() >= 64 and gaps.max() - gaps.min() <= 1  # even, and no predicted token read twice
    # documents touched, counted naively: a separator belongs to the document before it
    doc_of, doc = [], 0
    for token in tokens.tolist():
        doc_of.append(doc)
        doc += token == 0
    touched = {doc_of[i] for s in starts for i in range(s, s + 65)}
    assert windows.documents == len(touched) and windows.total_documents == 301
    assert f"touching {len(touched)} of its 301 documents" in windows.describe()
    # asking for more than fits gives the windows that fit, never overlapping predictions
    many = validation_windows(tokens, 64, val_tokens=10**9)
    assert many.count == (len(tokens) - 1) // 64 and np.diff(many.starts).min() >= 64
    with pytest.raises(DataError, match="a window of seq_len"):
        validation_windows(tokens[:64], 64)
