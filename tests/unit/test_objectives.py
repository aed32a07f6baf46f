"""Pretraining objectives mixed by ratio: the config refuses what it cannot run, naming the valid
choices; the assignment of samples to objectives follows the weights in every window and does not
depend on the data-parallel size; a mixed step's loss is the weighted sum of each objective's mean,
computed here by hand through the same model; clm alone is the language-model loss exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gorilla_dist.config import Config, validate
from gorilla_dist.objectives import objective_options
from gorilla_dist.data.loader import pack
from gorilla_dist.data.order import Blend
from gorilla_dist.errors import ConfigError, DataError
from gorilla_dist.objectives import Objectives
from tests.unit.test_nonfinite import REPO


def config(objectives, sources=2):
    from helpers import composed

    cfg = composed(*([f"data.sources=[{', '.join(f'{{path: /d/{i}}}' for i in range(sources))}]"] if sources else []))
    return OmegaConf.merge(cfg, {"train": {"objectives": objectives}})


@pytest.mark.parametrize(("objectives", "sources", "message"), [
    ([{"name": "mlm"}], 2, r"train.objectives\[0\].name='mlm'.*clm.*classify"),
    ([{"name": "clm"}, {"name": "clm", "weight": 2}], 2, "names clm twice"),
    ([{"name": "clm", "weight": 0}], 2, r"train.objectives\[0\].weight=0"),
    ([{"name": "clm"}, {"name": "classify", "target": "topic"}], 2, r"train.objectives\[1\].target='topic'"),
    ([{"name": "clm"}, {"name": "classify"}], 1, "nothing to tell apart"),
    ([], 2, "train.objectives is empty"),
    ([{"name": "denoise", "mask": 0}], 2, r"\[0\]: mask=0.0, replace=0.0, delete=0.0 are the weights"),
    ([{"name": "denoise", "replace": -1}], 2, r"mask=1.0, replace=-1"),
])
def test_bad_objectives_are_refused_naming_the_key_and_the_choices(objectives, sources, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(objectives, sources), world=1)


def test_every_window_follows_the_weights_and_a_resumed_blend_continues_it():
    weights = [0.7, 0.2, 0.1]
    blend = Blend(weights)
    seq = np.concatenate([blend.take(12)[0] for _ in range(50)])  # 50 global batches of 12
    for start in range(0, len(seq) - 40, 7):
        counts = np.bincount(seq[start:start + 40], minlength=3)
        assert np.all(np.abs(counts - 40 * np.array(weights)) <= 2)
    first = Blend(weights)
    first.take(24)
    resumed = Blend(weights)
    resumed.load_state_dict(first.state_dict())
    assert (np.concatenate([resumed.take(12)[0] for _ in range(48)]) == seq[24:]).all()


def loader_ids(tmp_path, dp: int) -> list[np.ndarray]:
    """Each global batch's objective ids, as the data-parallel ranks together see them."""
    from gorilla_dist.data.loader import ShardData
    from gorilla_dist.data.dataset import TokenDataset
    from gorilla_dist.data.tokenizer import load_tokenizer
    from gorilla_dist.data.writer import PrepareArgs, prepare

    src = tmp_path / "a.txt"
    if not src.exists():
        src.write_text("".join(f"document {i} " * 20 + "\n\n" for i in range(200)))
        prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "a"), tokenizer="byte", workers=1, progress=False))
    ds = TokenDataset(tmp_path / "a")
    ranks = [ShardData([ds], [1.0], load_tokenizer(ds.path), seq_length=32, micro_batch_size=8 // dp // 2,
                       global_batch_size=8, dp=dp, dp_rank=r, seed=0, val_fraction=0,
                       objectives=[objective_options(name="clm", weight=0.75),
                                   objective_options(name="classify", weight=0.25)]) for r in range(dp)]
    out = []
    for _ in range(6):
        out.append(np.concatenate([torch.cat([b.objective for b in data.next_train_batches()]).numpy()
                                   for data in ranks]))
    return out


def test_a_checkpoint_of_other_objective_weights_is_refused(tmp_path):
    """The loader state carries the objectives' weights: resuming with other weights would not continue
    the same assignment, so it is refused, naming both."""
    from gorilla_dist.data.dataset import TokenDataset
    from gorilla_dist.data.loader import ShardData
    from gorilla_dist.data.tokenizer import load_tokenizer

    loader_ids(tmp_path, 1)  # prepares tmp_path / "a"
    ds = TokenDataset(tmp_path / "a")

    def data(clm_weight):
        return ShardData([ds], [1.0], load_tokenizer(ds.path), seq_length=32, micro_batch_size=4, global_batch_size=8,
                         dp=1, dp_rank=0, seed=0, val_fraction=0,
                         objectives=[objective_options(name="clm", weight=clm_weight),
                                     objective_options(name="classify", weight=0.25)])

    saved = data(0.75)
    saved.next_train_batches()
    data(0.75).load_state_dict(saved.state_dict())  # the same weights continue
    with pytest.raises(DataError, match=r"assigned to objectives with weights \[0.75, 0.25\], this run's "
                                        r"train.objectives give \[0.666"):
        data(0.5).load_state_dict(saved.state_dict())


def test_the_loader_gives_the_same_objectives_on_every_data_parallel_size(tmp_path):
    one, two, four = (loader_ids(tmp_path, dp) for dp in (1, 2, 4))
    assert all((a == b).all() and (a == c).all() for a, b, c in zip(one, two, four))
    assert sum(int((x == 1).sum()) for x in one) == 12  # a quarter of 48 samples


def test_a_mixed_step_is_the_weighted_sum_of_each_objectives_mean(world1):
    """clm 0.75 + classify 0.25 on 4 samples (3 clm, 1 classify): the loss train_step takes equals
    0.75 * (clm loss summed over the clm samples' targets / their count) + 0.25 * (cross entropy of the
    head on the classify sample's mean-pooled hidden states), computed here from the model's own
    pieces; with clm alone the objectives give exactly lm_loss."""
    from gorilla_dist.loss import lm_loss, per_token_loss
    from gorilla_dist.model import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(Config).model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    model = build_model(cfg, vocab_size=16, dtype="fp32", device=world1.device, seed=1, heads={"classify": 3}).eval()
    tokens = np.random.default_rng(0).integers(0, 15, (4, 33))
    batch = pack(tokens, np.array([33, 33, 20, 33]), np.array([0, 2, 1, 1]), eod=15, reset_at_eod=False)
    batch.objective = torch.tensor([0, 0, 1, 0])
    objectives = Objectives([objective_options(name="clm", weight=3.0), objective_options(name="classify", weight=1.0)])
    units = objectives.units(batch)
    assert units.tolist() == [32.0 * 3, 1.0]
    with torch.no_grad():
        sums = objectives.sums(model, batch)
        loss = objectives.loss(sums, units)
        per_token = per_token_loss(model, batch)
        hidden = {}
        hook = model.decoder.register_forward_hook(lambda _m, _a, out: hidden.setdefault("h", out))
        model(batch.tokens, batch.position_ids, None)
        hook.remove()
    rows = torch.tensor([True, True, False, True])
    clm = (per_token[rows] * batch.loss_mask[rows]).sum() / batch.loss_mask[rows].sum()
    h = hidden["h"][:, 2]  # (s, hidden) of the classify sample
    mask = batch.loss_mask[2]
    pooled = (h * mask[:, None]).sum(0) / mask.sum()  # 19 scored positions (20 real tokens)
    ce = F.cross_entropy((model.objective_heads["classify"].weight @ pooled)[None], torch.tensor([1]))
    torch.testing.assert_close(loss, 0.75 * clm + 0.25 * ce, rtol=1e-5, atol=1e-6)
    assert sums[1, 1] == float(torch.argmax(model.objective_heads["classify"].weight @ pooled) == 1)
    plain = Objectives([objective_options(name="clm")])
    batch.objective = None
    with torch.no_grad():
        assert torch.equal(plain.loss(plain.sums(model, batch), plain.units(batch)), lm_loss(model, batch))


def test_classify_by_label_reads_each_labelled_example_at_its_class_position(world1):
    """classify target=label: cross entropy of the head's score at every position Batch.classes marks, in
    the classify samples only, averaged over those examples (two in one packed sample count twice)."""
    from gorilla_dist.loss import per_token_loss
    from gorilla_dist.model import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(Config).model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    model = build_model(cfg, vocab_size=16, dtype="fp32", device=world1.device, seed=1, heads={"classify": 3}).eval()
    tokens = np.random.default_rng(0).integers(0, 15, (3, 33))
    classes = np.full((3, 33), -1)
    classes[0, 5], classes[1, 7], classes[1, 20], classes[2, 9] = 2, 0, 1, 1  # sample 0 is a clm sample
    batch = pack(tokens, np.array([33, 33, 33]), np.array([0, 0, 0]), eod=15, reset_at_eod=False, classes=classes)
    batch.objective = torch.tensor([0, 1, 1])
    objectives = Objectives([objective_options(name="clm"), objective_options(name="classify", target="label",
                                                                          labels=["a", "b", "c"])])
    units = objectives.units(batch)
    assert units.tolist() == [32.0, 3.0]
    with torch.no_grad():
        loss = objectives.loss(objectives.sums(model, batch), units)
        per_token = per_token_loss(model, batch)
        scores = model.objective_scores["classify"]
    ce = F.cross_entropy(scores[[1, 1, 2], [7, 20, 9]], torch.tensor([0, 1, 1]))
    clm = (per_token[0] * batch.loss_mask[0]).sum() / batch.loss_mask[0].sum()
    torch.testing.assert_close(loss, 0.5 * clm + 0.5 * ce, rtol=1e-5, atol=1e-6)


def test_classify_by_label_takes_the_datas_classes_or_refuses():
    from gorilla_dist.objectives import head_sizes, resolve_labels

    configs = [objective_options(name="clm"), objective_options(name="classify", target="label")]
    resolve_labels(configs, ["no", "yes"])
    assert configs[1].labels == ["no", "yes"] and head_sizes(configs, 1) == {"classify": 2}
    with pytest.raises(ConfigError, match=r"train.objectives\[1\]: classify with target: label needs labelled data"):
        resolve_labels([objective_options(name="clm"), objective_options(name="classify", target="label")], None)
    with pytest.raises(ConfigError, match=r"labels=\['yes', 'no'\] but the data's classes are \['no', 'yes'\]"):
        resolve_labels([objective_options(name="classify", target="label", labels=["yes", "no"])], ["no", "yes"])
    validate(config([{"name": "clm"}, {"name": "classify", "target": "label"}], sources=1), world=1)  # one is enough


def test_the_contrastive_view_splits_the_longest_document_of_each_chosen_row():
    from gorilla_dist.objectives import contrastive_view

    eod = 9
    rows = np.array([[1, 2, eod, 3, 4, 5, 6, 7, eod, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]])
    batch = pack(rows, np.array([11, 11]), np.array([0, 0]), eod=eod, reset_at_eod=False)
    out = contrastive_view(batch, np.array([True, False]), eod)
    # row 0: documents [1 2] [3 4 5 6 7] [1 2]; the longest (positions 3..7) splits 2 + 3
    assert out.spans[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 0, 0]
    assert out.segments[0].tolist() == [2, 2, 2, 0, 0, 1, 1, 1, 2, 2]
    assert out.position_ids[0, 3:8].tolist() == [0, 1, 0, 1, 2]
    assert out.loss_mask[0].sum() == 0
    # row 1 keeps its attention (one segment), positions and targets
    assert out.spans[1].sum() == 0 and out.segments[1].tolist() == [0] * 10
    assert out.position_ids[1].tolist() == list(range(10)) and out.loss_mask[1].sum() == 10


def test_the_contrastive_loss_is_infonce_over_the_halves(world1):
    """Computed by hand from each half run alone through the model (the segment ids must keep the halves
    apart for this to hold), projected, normalised: cross entropy of first-half x second-half
    similarities / tau with the diagonal as the target."""
    from gorilla_dist.model import build_model
    from gorilla_dist.objectives import contrastive_view

    cfg = OmegaConf.merge(OmegaConf.structured(Config).model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    model = build_model(cfg, vocab_size=16, dtype="fp32", device=world1.device, seed=1,
                        heads={"contrastive": 8}).eval()
    tokens = np.random.default_rng(3).integers(0, 15, (3, 25))
    tokens[0, 6] = tokens[2, 15] = 15  # <eod>s: the longest documents are after / before them
    batch = contrastive_view(pack(tokens, np.array([25, 25, 25]), np.array([0, 0, 0]), eod=15, reset_at_eod=False),
                             np.array([True, True, True]), 15)
    objectives = Objectives([objective_options(name="contrastive", temperature=0.5)])
    with torch.no_grad():
        sums = objectives.sums(model, batch)
        halves = []
        for r in range(3):
            zs = []
            for half in (1, 2):
                ids = batch.tokens[r][batch.spans[r] == half][None]
                hidden = {}
                hook = model.decoder.register_forward_hook(lambda _m, _a, out: hidden.setdefault("h", out))
                model(ids, torch.arange(ids.shape[1])[None], None)
                hook.remove()
                zs.append(F.normalize(model.objective_heads["contrastive"].weight @ hidden["h"][:, 0].mean(0), dim=0))
            halves.append(zs)
        first, second = torch.stack([h[0] for h in halves]), torch.stack([h[1] for h in halves])
        logits = first @ second.T / 0.5
        ref = F.cross_entropy(logits, torch.arange(3), reduction="sum")
    torch.testing.assert_close(sums[0, 0], ref, rtol=1e-5, atol=1e-5)
    assert sums[0, 1] == (logits.argmax(-1) == torch.arange(3)).sum()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe:300"])
def test_special_tokens_get_ids_of_their_own_and_a_second_dataset_shares_them(tmp_path, kind):
    """prepare special_tokens=objectives: the mode tokens, separator and sentinels get ids (after <eod>
    for char / byte, which no text encodes to); a dataset prepared with the first one's tokenizer.json
    has the same ids; transformers' tokenizer from export maps them to the same ids; without the option
    nothing changes."""
    import json

    from gorilla_dist.data.tokenizer import OBJECTIVE_TOKENS, load_tokenizer
    from gorilla_dist.data.writer import PrepareArgs, prepare
    from gorilla_dist.export import hf_tokenizer

    src = tmp_path / "a.txt"
    src.write_text("".join(f"line {i} <|sep|> text\n\n" for i in range(300)))
    common = dict(workers=1, progress=False, sample_by="paragraph")
    plain = prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "plain"), tokenizer=kind, **common))
    meta = prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "a"), tokenizer=kind,
                               special_tokens="objectives", **common))
    tok, before = load_tokenizer(tmp_path / "a"), load_tokenizer(tmp_path / "plain")
    assert "specials" not in json.loads((tmp_path / "plain" / "tokenizer.json").read_text())
    assert "special_tokens" not in plain["prepare"]["fingerprint"] and meta["prepare"]["fingerprint"]["special_tokens"]
    assert tok.specials == OBJECTIVE_TOKENS and tok.vocab_size == before.vocab_size + len(OBJECTIVE_TOKENS)
    ids = [tok.special_id(n) for n in OBJECTIVE_TOKENS]
    assert ids == list(range(before.vocab_size, before.vocab_size + len(OBJECTIVE_TOKENS)))
    assert tok.eod == before.eod
    if kind in ("char", "byte"):  # the text "<|sep|>" stays characters
        assert tok.encode("<|sep|>").tolist() == before.encode("<|sep|>").tolist()
        assert tok.decode([tok.special_id("<|sentinel:3|>")]) == "<|sentinel:3|>"
    second = tmp_path / "b.txt"
    second.write_text("line text\n\n" * 50)
    prepare(PrepareArgs(input=[str(second)], output=str(tmp_path / "b"), tokenizer=str(tmp_path / "a" / "tokenizer.json"),
                        **common))
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    from tokenizers import Tokenizer

    exported = Tokenizer.from_str(hf_tokenizer(tok)[0])
    assert [exported.token_to_id(n) for n in OBJECTIVE_TOKENS] == ids
    with pytest.raises(Exception, match="special_tokens=objectives"):
        before.special_id("<|sep|>")


MODE, SENTINELS = 100, list(range(200, 264))


def restored(seq: np.ndarray, n_input: int) -> list[int]:
    """The source back from a span-corrupted sample: each sentinel in the input replaced by its span."""
    inputs, targets = seq[1:n_input].tolist(), seq[n_input:].tolist()
    spans, current = {}, None
    for t in targets:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    return [x for t in inputs for x in (spans[t] if t in SENTINELS else [t])]


@pytest.mark.parametrize(("n", "room", "mean_span", "rate"), [(60, 65, 3.0, 0.15), (60, 65, 1.0, 0.15),
                                                               (200, 65, 32.0, 0.5), (2, 65, 32.0, 0.15),
                                                               (1, 65, 3.0, 0.15)])
def test_span_corruption_hides_spans_behind_sentinels_that_the_target_restores(n, room, mean_span, rate):
    from gorilla_dist.objectives.denoise import corrupt

    source = np.arange(n) % 90
    seq, n_in = corrupt(source, room, np.random.default_rng(0), mode="R", mean_span=mean_span, rate=rate,
                        mode_token=MODE, sentinels=SENTINELS)
    assert seq[0] == MODE and len(seq) <= room
    used = restored(seq, n_in)
    assert used == source[:len(used)].tolist()  # a prefix of the source: all of it, or what fills the room
    assert len(used) == n or len(seq) >= room - 3
    inputs, targets = seq[1:n_in], seq[n_in:]
    k = int(np.isin(inputs, SENTINELS).sum())
    assert targets[0] == SENTINELS[0] and k == int(np.isin(targets, SENTINELS).sum()) >= 1
    noise = len(targets) - k
    if len(used) > 1:
        assert noise == min(max(1, round(len(used) * rate)), len(used) - 1)  # the rate, within rounding
        assert k == max(1, min(round(noise / mean_span), noise, len(used) - noise))  # spans of the mean length
    again, _ = corrupt(source, room, np.random.default_rng(0), mode="R", mean_span=mean_span, rate=rate,
                       mode_token=MODE, sentinels=SENTINELS)
    assert again.tolist() == seq.tolist()  # a function of the generator's seed


@pytest.mark.parametrize("kind", ["delete", "replace", "mixed"])
def test_spans_can_be_replaced_or_deleted_instead_of_masked(kind):
    """BART's other noisings in the same layout: a deleted span leaves nothing in the input, a replaced one
    as many tokens of the source (no sentinel either way); the target is the same sentinel-delimited spans
    as masking would give; the sample still fits its room."""
    from gorilla_dist.objectives.denoise import corrupt

    source, room = np.arange(40) + 10, 70  # distinct tokens: a token's value is its position + 10
    probs = {"delete": [0, 0, 1], "replace": [0, 1, 0], "mixed": [1 / 3] * 3}[kind]
    seq, n_in = corrupt(source, room, np.random.default_rng(1), mode="X", mean_span=4, rate=0.3, mode_token=MODE,
                        sentinels=SENTINELS, kinds=np.array(probs))
    inputs, targets = seq[1:n_in].tolist(), seq[n_in:].tolist()
    assert seq[0] == MODE and len(seq) <= room
    spans, current = [], None  # the target: sentinel 0, its span, sentinel 1, ...
    for t in targets:
        if t in SENTINELS:
            assert t == SENTINELS[len(spans)]
            spans.append(current := [])
        else:
            current.append(t)
    assert all(sp and sp == list(range(sp[0], sp[0] + len(sp))) for sp in spans)  # runs of the source
    hidden = {t for sp in spans for t in sp}
    used = len(source) if kind != "replace" else len(inputs)  # replace keeps the length
    kept = [t for t in source[:used].tolist() if t not in hidden]
    if kind == "delete":
        assert inputs == kept and not set(inputs) & set(SENTINELS)
    elif kind == "replace":
        assert len(inputs) == used and not set(inputs) & set(SENTINELS)
        assert [t for i, t in enumerate(inputs) if i + 10 not in hidden] == kept  # outside the spans: unchanged
        assert all(10 <= t < 10 + used for t in inputs)  # the replacements are tokens of the source
        assert any(inputs[sp[0] - 10:sp[-1] - 9] != sp for sp in spans)
    else:
        masked = [t for t in inputs if t in SENTINELS]  # some spans of each kind (this seed)
        assert 0 < len(masked) < len(spans) and len(inputs) - len(masked) > len(kept)  # + replacements


def test_the_s_denoiser_continues_a_prefix():
    from gorilla_dist.objectives.denoise import corrupt

    seq, n_in = corrupt(np.arange(40), 65, np.random.default_rng(0), mode="S", mean_span=3, rate=0.25,
                        mode_token=MODE, sentinels=SENTINELS)
    assert seq.tolist() == [MODE] + list(range(40)) and n_in == 1 + 30


def test_prefix_lm_segments_make_the_input_bidirectional_and_the_rest_causal(world1):
    """Segment ids: input tokens (document + BIDIRECTIONAL) are seen by every token of their document,
    later ones included; targets causally; the dense attention module computes exactly that."""
    from megatron.core.transformer.enums import AttnMaskType

    from gorilla_dist.kernels.dense import attention_reference, sdpa_keep_mask
    from gorilla_dist.kernels.limits import BIDIRECTIONAL as B
    from gorilla_dist.model import build_model

    seg = torch.tensor([[B, B, B, 0, 0, 1 + B, 1, 1]])
    keep = sdpa_keep_mask(seg, 8)[0, 0].int()
    assert keep.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1, 1, 1]]
    cfg = OmegaConf.merge(OmegaConf.structured(Config).model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    core = build_model(cfg, vocab_size=16, dtype="fp32", device=world1.device, seed=1).decoder.layers[0] \
        .self_attention.core_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 1, 4, 16, generator=g) for _ in range(3))
    out = core(q, k, v, seg, attn_mask_type=AttnMaskType.causal)
    ref = attention_reference(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), causal=False, mask=keep.bool(),
                              scale=core.softmax_scale)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(8, 1, 64), rtol=1e-5, atol=1e-5)


def test_denoise_samples_score_only_their_targets_and_do_not_depend_on_the_layout(tmp_path):
    """The loader's denoise rows: input bidirectional, positions continuous into the target, the loss on
    target tokens only; the same tokens for dp=1 and dp=2 (seeded per sample, not per rank)."""
    from gorilla_dist.data.dataset import TokenDataset
    from gorilla_dist.data.loader import ShardData
    from gorilla_dist.data.tokenizer import load_tokenizer
    from gorilla_dist.data.writer import PrepareArgs, prepare
    from gorilla_dist.kernels.limits import BIDIRECTIONAL

    src = tmp_path / "a.txt"
    src.write_text("".join(f"document {i} " * 20 + "\n\n" for i in range(100)))
    prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "a"), tokenizer="byte", workers=1, progress=False,
                        special_tokens="objectives"))
    ds = TokenDataset(tmp_path / "a")
    tok = load_tokenizer(ds.path)
    objectives = [objective_options(name="clm"), objective_options(name="denoise", mode="R")]

    def batches(dp):
        ranks = [ShardData([ds], [1.0], tok, seq_length=64, micro_batch_size=4 // dp, global_batch_size=4, dp=dp,
                           dp_rank=r, seed=0, val_fraction=0, objectives=objectives) for r in range(dp)]
        return [[torch.cat([getattr(b, f) for data in ranks for b in data.next_train_batches()])
                 for f in ("tokens", "objective", "loss_mask", "segments", "position_ids")] for _ in range(3)]

    one, two = batches(1), batches(2)
    for a, b in zip(one, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    tokens, objective, loss, seg, pos = one[0]
    r = int(torch.nonzero(objective == 1)[0])
    n_in = int((seg[r] >= BIDIRECTIONAL).sum())
    assert tokens[r, 0] == tok.special_id("<|mode:R|>") and (seg[r, :n_in] >= BIDIRECTIONAL).all()
    assert loss[r, :n_in - 1].sum() == 0 and loss[r, n_in - 1] == 1  # the first target token, predicted
    assert tokens[r, n_in] == tok.special_id("<|sentinel:0|>")
    assert pos[r, :n_in + 5].tolist() == list(range(n_in + 5))
    with pytest.raises(Exception, match="special_tokens=objectives"):
        prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "plain"), tokenizer="byte", workers=1,
                            progress=False))
        ShardData([TokenDataset(tmp_path / "plain")], [1.0], load_tokenizer(tmp_path / "plain"), seq_length=64,
                  micro_batch_size=4, global_batch_size=4, dp=1, dp_rank=0, seed=0, val_fraction=0,
                  objectives=objectives)


def test_sentence_permutation_shuffles_sentences_before_the_separator_and_keeps_the_original_after():
    from gorilla_dist.data.tokenizer import CharTokenizer
    from gorilla_dist.objectives.denoise import permute_sentences, sentence_ends

    tok = CharTokenizer(" !.?ABCDEFGHIJ\n")
    ends = sentence_ends(tok)
    assert [tok.chars[i] for i in np.flatnonzero(ends[:-1])] == ["!", ".", "?", "\n"] and ends[tok.eod]
    source = tok.encode("AB. CD! EF? GH")
    seq, n_in = permute_sentences(source, 65, np.random.default_rng(3), ends=ends, sep=99)
    assert n_in == len(source) + 1 and seq[n_in - 1] == 99 and seq[n_in:].tolist() == source.tolist()
    shuffled = tok.decode(seq[:n_in - 1].tolist())
    pieces = ["AB.", " CD!", " EF?", " GH"]  # the sentences, each whole, in another order
    assert shuffled != "".join(pieces) and any(shuffled == "".join(p) for p in itertools.permutations(pieces))
    one, n = permute_sentences(tok.encode("ABCDEFG"), 65, np.random.default_rng(1), ends=ends, sep=99)
    assert tok.decode(one[:n - 1].tolist()) == "ABCDEFG"  # no sentence boundary: the text as it is
    long, n = permute_sentences(np.arange(100) % 4, 65, np.random.default_rng(1), ends=ends, sep=99)
    assert len(long) <= 65 and n == 33  # both copies fit: the first 32 tokens


def test_sentence_permutation_with_a_bpe_tokenizer_moves_whole_sentences(tmp_path):
    """The same rule for BPE: a token ends a sentence when its text (trailing spaces removed) ends with . ! ?
    or a newline, wherever the merges put the punctuation; the input is the sentences of the source,
    each whole, in another order."""
    from gorilla_dist.data.tokenizer import load_tokenizer
    from gorilla_dist.data.writer import PrepareArgs, prepare
    from gorilla_dist.objectives.denoise import permute_sentences, sentence_ends

    src = tmp_path / "a.txt"
    src.write_text("".join(f"The cat sat {i}. A dog ran! Who knew? Fine then\n\n" for i in range(200)))
    prepare(PrepareArgs(input=[str(src)], output=str(tmp_path / "bpe"), tokenizer="bpe:300", workers=1,
                        progress=False, sample_by="paragraph", special_tokens="objectives"))
    tok = load_tokenizer(tmp_path / "bpe")
    ends = sentence_ends(tok)
    source = tok.encode("The cat sat 7. A dog ran! Who knew? Fine then")
    cut = np.flatnonzero(ends[source[:-1]]) + 1
    pieces = [tok.decode(p.tolist()) for p in np.split(source, cut)]
    assert len(pieces) == 4 and [p.rstrip(" ")[-1] for p in pieces[:3]] == [".", "!", "?"]
    sep = tok.special_id("<|sep|>")
    seq, n_in = permute_sentences(source, 65, np.random.default_rng(0), ends=ends, sep=sep)
    assert seq[n_in - 1] == sep and seq[n_in:].tolist() == source.tolist()
    shuffled = tok.decode(seq[:n_in - 1].tolist())
    orders = ["".join(p) for p in itertools.permutations(pieces)]
    assert shuffled in orders and shuffled != "".join(pieces)


def test_a_micro_batch_without_contrastive_samples_adds_nothing(world1):
    from gorilla_dist.model import build_model

    cfg = OmegaConf.merge(OmegaConf.structured(Config).model, OmegaConf.load(REPO / "conf/model/debug.yaml"))
    model = build_model(cfg, vocab_size=16, dtype="fp32", device=world1.device, seed=1, heads={"contrastive": 8})
    batch = pack(np.random.default_rng(0).integers(0, 15, (2, 17)), np.array([17, 17]), np.array([0, 0]), eod=15,
                 reset_at_eod=False)
    batch.objective = torch.tensor([0, 0])
    objectives = Objectives([objective_options(name="clm"), objective_options(name="contrastive")])
    sums = objectives.sums(model, batch)
    assert sums[1].tolist() == [0.0, 0.0] and objectives.units(batch).tolist() == [32.0, 0.0]
    objectives.loss(sums, objectives.units(batch).clamp(min=1)).backward()
    assert model.objective_heads["contrastive"].weight.grad is not None  # (in the graph: ZeRO sees a gradient)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=6), micro=st.integers(1, 3),
       dp=st.sampled_from([1, 2, 4]), accumulation=st.integers(1, 3), steps=st.integers(1, 12))
def test_objective_counts_follow_the_weights_in_every_window_whatever_the_layout(weights, micro, dp, accumulation,
                                                                                steps):
    """The objective of every sample, in order, for any micro-batch size, data-parallel size and
    accumulation with the same global batch: one sequence; every window of it is within 2 samples of
    the weights (the blend rule's bound)."""
    global_batch = micro * dp * accumulation
    blend = Blend(weights)
    seq = np.concatenate([blend.take(global_batch)[0] for _ in range(steps)])
    again = Blend(weights)
    assert (np.concatenate([again.take(1)[0] for _ in range(len(seq))]) == seq).all()  # batch size is free
    share = np.asarray(weights) / sum(weights)
    for width in (1, 7, len(seq)):
        for start in range(0, len(seq) - width + 1, max(1, width // 2)):
            counts = np.bincount(seq[start:start + width], minlength=len(weights))
            assert np.all(np.abs(counts - width * share) <= 2)
