"""Tokenizers, the token-file cache, and the resumable window sampler."""

import numpy as np
import pytest
import torch

from gorilla_dist.data import WindowData, load_tokenizer, prepare_text
from gorilla_dist.data.text import ByteTokenizer, bundled_corpus
from gorilla_dist.errors import DataError


def test_bundled_corpus_is_tinyshakespeare():
    import hashlib

    digest = hashlib.sha256(bundled_corpus().read_bytes()).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_char_prepare_round_trips_and_splits(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
    src = tmp_path / "c.txt"
    src.write_text(text)
    meta = prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    tok = load_tokenizer(tmp_path / "d")
    assert meta["vocab_size"] == len(set(text)) == tok.vocab_size
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    assert len(val) == int(len(text) * 0.1) and len(train) + len(val) == len(text)
    assert tok.decode(np.concatenate([train, val]).tolist()) == text
    # unchanged source + tokenizer: reused, not rewritten
    before = (tmp_path / "d" / "train.bin").stat().st_mtime_ns
    prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    assert (tmp_path / "d" / "train.bin").stat().st_mtime_ns == before


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve café — ünïcödé"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256


def test_switching_tokenizer_in_one_data_dir_refuses(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("hello world, hello tokens\n" * 50)
    prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    with pytest.raises(DataError, match="tokenized with 'char', not data.tokenizer='byte'"):
        prepare_text(str(src), "byte", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    assert load_tokenizer(tmp_path / "d").kind == "char"  # the existing data is untouched


def test_changed_corpus_never_replaces_a_runs_token_files(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("hello world, hello tokens\n" * 50)
    prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    before = (tmp_path / "d" / "train.bin").read_bytes()
    copy = tmp_path / "copy.txt"  # same content elsewhere (a fresh clone, a copied corpus): reused
    copy.write_text(src.read_text())
    prepare_text(str(copy), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    src.write_text("a different corpus entirely\n" * 50)
    with pytest.raises(DataError, match="was prepared from different data"):
        prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1, min_tokens=10)
    assert (tmp_path / "d" / "train.bin").read_bytes() == before
    (tmp_path / "foreign").mkdir()
    with pytest.raises(DataError, match="not prepared by gorilla_dist"):
        prepare_text(str(src), "char", tmp_path / "foreign", val_fraction=0.1, min_tokens=10)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "contains NUL bytes: it looks binary"),
    (b"caf\xe9 latin-1 text", "is not UTF-8 text: undecodable byte at offset 3"),
    (b"too short", "the train split has 9 tokens, fewer than model.seq_length + 2 = 66"),
])
def test_bad_corpus_gets_one_clear_error(tmp_path, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        prepare_text(str(src), "char", tmp_path / "d", val_fraction=0.1 if content != b"too short" else 0.0001,
                     min_tokens=66)
    assert not (tmp_path / "d").exists()


def windows(dp, dp_rank, micro=3, global_batch=12, seed=7):
    data = np.arange(1000, dtype=np.uint16)
    return WindowData(data, data[:100], ByteTokenizer(), seq_length=8, micro_batch_size=micro,
                      global_batch_size=global_batch, dp=dp, dp_rank=dp_rank, seed=seed,
                      device=torch.device("cpu"))


def test_windows_are_shifted_targets_and_rank_slices_cover_the_global_batch():
    single = windows(1, 0, micro=12)
    ranks = [windows(2, r, micro=3) for r in range(2)]
    for _ in range(3):
        (x, y), = single.next_train_batches()
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
        per_rank = [torch.cat([b[0] for b in r.next_train_batches()]) for r in ranks]
        assert all(len(b) == 6 for b in per_rank)
        assert torch.equal(torch.cat(per_rank), x)  # dp=2 ranks together see exactly the dp=1 batch


def test_state_dict_resumes_the_same_sequence_and_seed_changes_it():
    a = windows(1, 0)
    for _ in range(5):
        a.next_train_batches()
    b = windows(1, 0)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a.next_train_batches(), b.next_train_batches()))
    with pytest.raises(DataError, match="saved with seed=7, this run has 8"):
        windows(1, 0, seed=8).load_state_dict(b.state_dict())
    with pytest.raises(DataError, match="saved with global_batch_size=12, this run has 24"):
        windows(1, 0, micro=24, global_batch=24).load_state_dict(b.state_dict())
    c = windows(1, 0, seed=8)
    c.position = b.position
    assert not torch.equal(b.next_train_batches()[0][0], c.next_train_batches()[0][0])
    # validation windows are the same at every evaluation
    assert torch.equal(a.val_batches(2)[1][0], a.val_batches(2)[1][0])
