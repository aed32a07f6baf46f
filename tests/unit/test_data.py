"""The training-side data path: tokenizers, the document split, packing, attention reset, loader state."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from gorilla_dist.data.dataset import TokenDataset
from gorilla_dist.data.loader import ShardData, bundled_corpus, pack
from gorilla_dist.data.writer import PrepareArgs, prepare
from gorilla_dist.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer
from gorilla_dist.errors import DataError
from gorilla_dist.kernels.dense import sdpa_keep_mask


def test_bundled_corpus_is_tinyshakespeare():
    digest = hashlib.sha256(bundled_corpus().read_bytes()).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_char_and_byte_tokenizers_round_trip_and_end_documents():
    text = "naïve café — ünïcödé 🙂\n"
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text).tolist()) == text and byte.encode(text).max() < 256 == byte.eod
    char = CharTokenizer("".join(sorted(set(text))))
    assert char.decode(char.encode(text).tolist()) == text and char.eod == char.vocab_size - 1
    assert char.decode([*char.encode("na").tolist(), char.eod]) == "na\n"  # <eod> reads as a line break
    with pytest.raises(DataError, match=r"characters \['x', 'z'\] are not in this char vocabulary"):
        char.encode("xz")


def make_dataset(path, docs: list[str], **kw) -> TokenDataset:
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.parent / (path.name + ".txt")
    src.write_text("".join(d + "\n" for d in docs))
    prepare(PrepareArgs(input=[str(src)], output=str(path), tokenizer="byte", sample_by="line", workers=1,
                        progress=False, **kw))
    return TokenDataset(path)


def test_validation_is_the_last_documents(tmp_path):
    docs = [f"document number {i}" for i in range(20)]
    d = make_dataset(tmp_path / "d", docs)
    (a, b), (c, e) = d.split(0.1)
    tok = load_tokenizer(tmp_path / "d")
    assert (a, e) == (0, d.tokens) and b == c == int(d.offsets[18])
    assert tok.decode(d.read(c, e).tolist()) == "document number 18\ndocument number 19\n"
    with pytest.raises(DataError, match="1 document\\(s\\) cannot be split into train and validation"):
        make_dataset(tmp_path / "one", ["just one"]).split(0.1)


def test_pack_shifts_targets_masks_padding_and_resets_at_documents():
    eod = 9
    windows = np.array([[1, 2, eod, 3, 4, 5, eod, 6, 7],
                        [1, 2, 3, 4, eod, eod, eod, eod, eod]])  # row 2: 5 real tokens, then padding
    valid = np.array([9, 5])
    plain = pack(windows.copy(), valid, np.array([0, 1]), eod=eod, reset_at_eod=False)
    assert plain.tokens.tolist()[0] == [1, 2, eod, 3, 4, 5, eod, 6] and plain.labels.tolist()[0][-1] == 7
    assert plain.loss_mask.tolist() == [[1.0] * 8, [1, 1, 1, 1, 0, 0, 0, 0]]
    assert plain.segments is None and plain.position_ids.tolist()[0] == list(range(8))

    reset = pack(windows.copy(), valid, np.array([0, 1]), eod=eod, reset_at_eod=True)
    assert reset.position_ids.tolist()[0] == [0, 1, 2, 0, 1, 2, 3, 0]
    assert reset.loss_mask.tolist()[0] == [1, 1, 0, 1, 1, 1, 0, 1]  # no prediction across a boundary
    doc = [0, 0, 0, 1, 1, 1, 1, 2]
    assert reset.segments.tolist()[0] == doc
    allowed = sdpa_keep_mask(reset.segments, 8)[0, 0]  # what the dense attention builds on the device
    expected = torch.tensor([[j <= i and doc[i] == doc[j] for j in range(8)] for i in range(8)])
    assert torch.equal(allowed, expected)


def test_attention_reset_makes_a_packed_document_equal_to_the_document_alone(world1):
    """Through the real megatron model: with reset_at_eod, the second document's per-token losses
    inside a packed sample equal those of the same document run on its own (learned positions,
    so the position ids matter too)."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import ModelConfig
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=16, position_embedding="learned_absolute"))
    model = build_model(m, vocab_size=16, dtype="fp32", device=world1.device, seed=3).eval()
    eod, s = 15, m.seq_length
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 15, 5), rng.integers(0, 15, s - 5)
    packed = np.concatenate([first, [eod], second])[None, :s + 1]
    alone = np.concatenate([second, [eod] * 7])[None, :s + 1]
    b1 = pack(packed, np.array([s + 1]), np.array([0]), eod=eod, reset_at_eod=True)
    b2 = pack(alone, np.array([s + 1]), np.array([0]), eod=eod, reset_at_eod=True)
    with torch.no_grad():
        l1 = model(b1.tokens, b1.position_ids, b1.segments, labels=b1.labels)[0, 6:]
        l2 = model(b2.tokens, b2.position_ids, b2.segments, labels=b2.labels)[0, :s - 6]
        l3 = model(b1.tokens, b1.position_ids * 0 + torch.arange(s), None, labels=b1.labels)[0, 6:]
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert (l3 - l2).abs().max() > 1e-3  # without the reset the first document leaks in


def loader(datasets, weights=None, *, dp=1, rank=0, micro=2, global_batch=8, seed=5, val_fraction=0.1, **kw):
    return ShardData(datasets, weights or [1.0] * len(datasets), load_tokenizer(datasets[0].path), seq_length=16,
                     micro_batch_size=micro, global_batch_size=global_batch, dp=dp, dp_rank=rank, seed=seed,
                     val_fraction=val_fraction, **kw)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    web = make_dataset(root / "web", [f"web page {i} " * (1 + i % 5) for i in range(120)])
    code = make_dataset(root / "code", [f"def f{i}(): return {i}" for i in range(80)])
    return [web, code]


def test_batches_carry_their_source_and_validation_is_fixed(two_sources):
    data = loader(two_sources, [0.75, 0.25])
    batches = data.next_train_batches()
    assert len(batches) == 4 and all(b.tokens.shape == (2, 16) for b in batches)
    sources = torch.cat([b.source for b in batches]).tolist()
    assert sources.count(0) == 6 and sources.count(1) == 2
    for b in batches:  # each sample's tokens come from the source it is labelled with
        for row, src in zip(b.tokens, b.source.tolist()):
            text = bytes(t for t in row.tolist() if t < 256)
            assert (b"web page" in text or b"def f" not in text) if src == 0 else b"web" not in text
    first, again = data.val_batches(2), data.val_batches(2)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, again))


@pytest.mark.parametrize("n", [5, 8, 1])
def test_validation_scores_the_same_samples_for_every_layout(two_sources, n):
    """train.eval_samples: the first n samples of the validation blend, whatever the data-parallel size and
    micro-batch; the rows that fill the last micro-batches (equal forwards on every rank) score nothing."""
    def scored(dp, micro):
        rows, forwards = [], set()
        for rank in range(dp):
            batches = loader(two_sources, [0.75, 0.25], dp=dp, rank=rank, micro=micro).val_batches(n)
            forwards.add(len(batches))
            for b in batches:
                assert b.tokens.shape[0] == micro
                assert not b.loss_mask[~b.scored].any() and b.loss_mask[b.scored].sum(1).gt(0).all()
                rows += [(r.tolist(), s) for r, s in zip(b.tokens[b.scored], b.source[b.scored].tolist())]
        assert len(forwards) == 1  # every rank runs the same number of forwards
        return sorted(map(str, rows))

    one = scored(1, 2)
    assert len(one) == n
    for dp, micro in [(1, 3), (2, 1), (2, 2), (4, 1)]:
        assert scored(dp, micro) == one, (dp, micro)


def test_state_dict_refuses_another_seed_or_other_sources(two_sources):
    a = loader(two_sources, [0.5, 0.5])
    a.next_train_batches()
    state = a.state_dict()
    with pytest.raises(DataError, match="made with run.seed=5, this run has 6"):
        loader(two_sources, [0.5, 0.5], seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="made from other data.sources"):
        loader(two_sources, [0.7, 0.3]).load_state_dict(state)
    b = loader(two_sources, [0.5, 0.5])
    b.load_state_dict(state)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a.next_train_batches(), b.next_train_batches()))


def test_build_data_refuses_sources_with_different_tokenizers(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from gorilla_dist.config import Config
    from gorilla_dist.data.loader import build_data

    byte = make_dataset(tmp_path / "byte", ["hello there"] * 10)
    (tmp_path / "c.txt").write_text("hello there\n" * 10)
    prepare(PrepareArgs(input=[str(tmp_path / "c.txt")], output=str(tmp_path / "char"), tokenizer="char",
                        sample_by="line", workers=1, progress=False))
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"run": {"dir": str(tmp_path / "run")}, "data": {
        "sources": [{"path": str(byte.path)}, {"path": str(tmp_path / "char")}]}})
    layout = SimpleNamespace(is_main=True, world=1, rank=0, dp=1, dp_rank=0, device=torch.device("cpu"))
    with pytest.raises(DataError, match="were prepared with different tokenizers"):
        build_data(cfg.data, run=cfg.run, train=cfg.train, seq_length=16, layout=layout)
