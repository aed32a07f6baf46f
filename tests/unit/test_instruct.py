"""Instruction data: templates and loss masks against hand-written token lists, bad rows, packing of
whole examples, and packed per-token losses equal to each example alone through the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gorilla_dist.data.dataset import TokenDataset
from gorilla_dist.data.loader import ShardData
from gorilla_dist.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from gorilla_dist.data.writer import PrepareArgs, prepare
from gorilla_dist.errors import DataError

EOD = 256  # the byte tokenizer's <eod>


def write_rows(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def prepare_rows(tmp_path, rows, name="out", **kw) -> TokenDataset:
    src = write_rows(tmp_path / f"{name}.jsonl", rows)
    args = dict(tokenizer="byte", workers=1, progress=False, format="instruction") | kw
    prepare(PrepareArgs(input=[src], output=str(tmp_path / name), **args))
    return TokenDataset(tmp_path / name)


def examples(d: TokenDataset) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss mask) of every example (document) of a prepared dataset."""
    off = np.asarray(d.offsets)
    return [(d.read(a, b).tolist(), d.read(a, b, mask=True).tolist()) for a, b in zip(off[:-1], off[1:])]


def b(text: str) -> list[int]:
    return list(text.encode())


def test_instruction_rows_render_with_the_default_template_and_mask_only_outputs(tmp_path):
    d = prepare_rows(tmp_path, [{"instruction": "Say hi", "output": "hi"},
                                {"instruction": "Add", "input": "1 2", "output": "3"},
                                {"instruction": "Echo", "input": "", "output": "x"}])  # empty input: no Input
    (t1, m1), (t2, m2), (t3, m3) = examples(d)
    p1 = b("Instruction:\nSay hi\n\nResponse:\n")
    assert t1 == p1 + b("hi") + [EOD] and m1 == [0] * len(p1) + [1, 1, 1]
    p2 = b("Instruction:\nAdd\n\nInput:\n1 2\n\nResponse:\n")
    assert t2 == p2 + b("3") + [EOD] and m2 == [0] * len(p2) + [1, 1]
    p3 = b("Instruction:\nEcho\n\nResponse:\n")
    assert t3 == p3 + b("x") + [EOD] and m3 == [0] * len(p3) + [1, 1]
    assert d.meta["examples"]["bad_rows_skipped"] == 0


def test_messages_put_the_loss_on_assistant_turns_each_ending_with_eod(tmp_path):
    d = prepare_rows(tmp_path, [{"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                              {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}])
    [(tokens, mask)] = examples(d)
    parts = [(b("System:\nBe brief.\n\nUser:\nQ1\n\nAssistant:\n"), 0), (b("A1") + [EOD], 1),
             (b("User:\nQ2\n\nAssistant:\n"), 0), (b("A2") + [EOD], 1)]
    assert tokens == sum((p for p, _ in parts), [])
    assert mask == sum(([m] * len(p) for p, m in parts), [])


def test_train_on_inputs_and_a_template_file(tmp_path):
    template = tmp_path / "chatml.yaml"
    template.write_text('user: "<|im_start|>user\\n{content}<|im_end|>\\n"\n'
                        'assistant: "<|im_start|>assistant\\n{content}<|im_end|>\\n"\n'
                        'output: "### Answer: {output}."\n')
    d = prepare_rows(tmp_path, [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                                {"instruction": "I", "output": "O"}], template=str(template))
    (t1, m1), (t2, m2) = examples(d)
    prompt, target = b("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"), b("A<|im_end|>\n") + [EOD]
    assert t1 == prompt + target and m1 == [0] * len(prompt) + [1] * len(target)  # text after {content}: target
    prompt = b("Instruction:\nI\n\nResponse:\n### Answer: ")  # the default instruction key, the file's output
    assert t2 == prompt + b("O.") + [EOD] and m2 == [0] * len(prompt) + [1, 1, 1]

    everything = prepare_rows(tmp_path, [{"instruction": "I", "output": "O"}], name="all", train_on_inputs=True)
    [(t, m)] = examples(everything)
    assert m == [1] * len(t)


def test_parts_are_tokenized_apart_with_a_bpe_tokenizer(tmp_path):
    """A BPE merges across the prompt/output boundary when encoded as one string; each part is encoded
    alone, so the mask marks exactly the output's tokens."""
    tok = train_bpe(["Instruction: Response: hello world " * 50], 300)
    save_tokenizer(tok, tmp_path / "tok.json")
    d = prepare_rows(tmp_path, [{"instruction": "hello", "output": "world"}], tokenizer=str(tmp_path / "tok.json"))
    [(tokens, mask)] = examples(d)
    prompt, output = tok.encode("Instruction:\nhello\n\nResponse:\n").tolist(), tok.encode("world").tolist()
    assert tokens == prompt + output + [tok.eod] and mask == [0] * len(prompt) + [1] * (len(output) + 1)


@pytest.mark.parametrize(("template", "message"), [
    ('output: "Answer:"', r"output has no \{output\} placeholder"),
    ('instruction_input: "{instruction}"', r"instruction_input has no \{input\} placeholder"),
    ('user: "{content} {name}"', r"user names \{name\}, which is not a field it can use"),
    ('answer: "{output}"', r"unknown key\(s\) \['answer'\]"),
])
def test_a_bad_template_is_refused_naming_the_placeholder(tmp_path, template, message):
    (tmp_path / "t.yaml").write_text(template + "\n")
    with pytest.raises(DataError, match=message):
        prepare_rows(tmp_path, [{"instruction": "I", "output": "O"}], template=str(tmp_path / "t.yaml"))
    assert not (tmp_path / "out").exists()


BAD_ROWS = [
    ({"instruction": "I", "output": ""}, "field 'output' is empty"),
    ({"instruction": "I"}, "field 'output' is missing"),
    ({"instruction": 3, "output": "O"}, "field 'instruction' is a int, expected a string"),
    ('{"instruction": "I", "output": ', "not a JSON object"),
    ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
     "the last message is from 'user'"),
    ({"messages": [{"role": "robot", "content": "A"}]}, r"messages\[0\]: role 'robot'"),
    ({"text": "plain"}, r"no 'instruction'/'output' or 'messages' field \(found \['text'\]\)"),
    ({"instruction": "I", "output": "O", "label": 1.5}, r"field 'label' is 1.5; expected a string or an integer >= 0"),
    ({"instruction": "I", "output": "O", "label": -1}, r"field 'label' is -1"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_a_bad_row_fails_naming_file_and_line_and_leaves_no_output(tmp_path, row, message):
    good = {"instruction": "I", "output": "O"}
    with pytest.raises(DataError, match=rf"out\.jsonl:2: .*{message}.*on_bad_row=skip"):
        prepare_rows(tmp_path, [good, row, good])
    assert not (tmp_path / "out").exists()


def test_labels_mark_the_last_prompt_token_with_the_class_id(tmp_path):
    """Labelled rows (with or without an output, instruction or messages): labels.bin holds each example's
    class id (sorted names) and the index of its last prompt token; a row without output ends with an
    <eod> outside the loss."""
    d = prepare_rows(tmp_path, [{"instruction": "Who", "input": "x", "output": "B", "label": "bee"},
                                {"instruction": "Who", "label": "ant"},
                                {"messages": [{"role": "user", "content": "Q"}], "label": "cat"},
                                {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                 "label": "ant"}], train_on_inputs=True)
    (t1, m1), (t2, m2), (t3, m3), (t4, m4) = examples(d)
    p1, p2, p3 = b("Instruction:\nWho\n\nInput:\nx\n\nResponse:\n"), b("Instruction:\nWho\n\nResponse:\n"), b("User:\nQ\n\n")
    assert t1 == p1 + b("B") + [EOD] and t2 == p2 + [EOD] and t3 == p3 + [EOD]
    assert t4 == p3 + b("Assistant:\n") + b("A") + [EOD]
    assert m2 == [1] * len(t2)  # (train_on_inputs: the label's position does not depend on the mask)
    assert d.label_names == ["ant", "bee", "cat"]
    assert np.asarray(d.labels).tolist() == [[1, len(p1) - 1], [0, len(p2) - 1], [2, len(p3) - 1],
                                             [0, len(p3) + len(b("Assistant:\n")) - 1]]
    ints = prepare_rows(tmp_path, [{"instruction": "I", "label": 2}, {"instruction": "I", "label": 0}], name="ints")
    assert ints.label_names == ["0", "1", "2"] and np.asarray(ints.labels)[:, 0].tolist() == [2, 0]
    with pytest.raises(DataError, match=r"out3\.jsonl:2 has a 'label' field and .*out3\.jsonl:1 has none"):
        prepare_rows(tmp_path, [{"instruction": "I", "output": "O"}, {"instruction": "I", "label": "a"}], name="out3")
    with pytest.raises(DataError, match="field 'output' is missing"):  # no label: the output is needed
        prepare_rows(tmp_path, [{"instruction": "I"}], name="out4")


def test_packed_samples_carry_each_examples_class_at_its_last_prompt_token(tmp_path):
    rows = [{"instruction": "Who" + "?" * i, "output": "O" * (i % 3 + 1), "label": f"c{i % 4}"} for i in range(12)]
    d = prepare_rows(tmp_path, rows)
    data = ShardData([d], [1.0], load_tokenizer(d.path), seq_length=64, micro_batch_size=4, global_batch_size=4,
                     dp=1, dp_rank=0, seed=0, val_fraction=0)
    assert data.label_names == ["c0", "c1", "c2", "c3"]
    batch = data.samples(data.train, np.zeros(data.train[0].samples, dtype=np.int64),
                         np.arange(data.train[0].samples), shuffle=False)
    seen = []
    for r in range(batch.tokens.shape[0]):
        at = (batch.classes[r] >= 0).nonzero().flatten()
        assert batch.segments[r][at].tolist() == list(range(len(at)))  # one per example of the sample
        assert bytes(batch.tokens[r][at].tolist()) == b"\n" * len(at)  # "Response:\n"'s newline
        assert (batch.labels[r][at] == ord("O")).all() and (batch.loss_mask[r][at] == 1).all()  # next: the output
        seen += batch.classes[r][at].tolist()
    assert seen == [i % 4 for i in range(12)]


def test_bad_rows_are_skipped_and_counted(tmp_path):
    good = {"instruction": "I", "output": "O"}
    d = prepare_rows(tmp_path, [good, *(row for row, _ in BAD_ROWS), good], on_bad_row="skip")
    assert d.documents == 2 and d.meta["examples"]["bad_rows_skipped"] == len(BAD_ROWS)


def test_rows_with_characters_the_run_vocabulary_lacks(tmp_path):
    """The base model's tokenizer.json as is (a char vocabulary): a row it cannot encode is a bad row."""
    base = prepare_rows(tmp_path, [{"instruction": "ab", "output": "ba"}], name="base", tokenizer="char")
    rows = [{"instruction": "ab", "output": "ab"}, {"instruction": "ab", "output": "xyz"}]
    with pytest.raises(DataError, match=r"out\.jsonl:2: characters \['x', 'y', 'z'\] are not in this char"):
        prepare_rows(tmp_path, rows, tokenizer=str(base.path / "tokenizer.json"))
    d = prepare_rows(tmp_path, rows, tokenizer=str(base.path / "tokenizer.json"), on_bad_row="skip")
    assert d.documents == 1 and d.meta["examples"]["bad_rows_skipped"] == 1
    assert (d.path / "tokenizer.json").read_bytes() == (base.path / "tokenizer.json").read_bytes()


def test_text_input_is_refused_for_instruction_data(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(DataError, match="instruction data is read from .jsonl"):
        prepare(PrepareArgs(input=[str(tmp_path / "a.txt")], output=str(tmp_path / "o"), format="instruction",
                            workers=1, progress=False))


# -- loading: packing whole examples ------------------------------------------------------------------

def qa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    return [{"instruction": " ".join(rng.choice(words, rng.integers(1, 4))), "output": str(int(x))}
            for x in rng.integers(0, 10 ** rng.integers(1, 6, n), dtype=np.int64)]


def loader(datasets, seq=64, **kw):
    return ShardData(datasets, [1.0] * len(datasets), load_tokenizer(datasets[0].path), seq_length=seq,
                     micro_batch_size=4, global_batch_size=8, dp=1, dp_rank=0, seed=1, val_fraction=0, **kw)


@pytest.mark.parametrize("pack", [True, False])
def test_samples_hold_consecutive_whole_examples_with_their_masks(tmp_path, pack):
    d = prepare_rows(tmp_path, qa_rows(40))
    data = loader([d], seq=128, pack=pack)
    span, exs = data.train[0], examples(d)
    assert (span.samples < d.documents / 2) if pack else (span.samples == d.documents)
    seen = []
    for j in range(span.samples):
        batch = data.samples(data.train, np.array([0]), np.array([j]), shuffle=False)
        window = np.append(batch.tokens[0].numpy(), batch.labels[0, -1].item())
        if pack:
            seg = np.append(batch.segments[0].numpy(), -1)
        else:  # one example, then padding: plain causal attention, no segment ids
            assert batch.segments is None
            seg = np.where(np.arange(len(window)) < len(exs[span.first[j]][0]), 0, 1)
        pos, loss = batch.position_ids[0].numpy(), batch.loss_mask[0].numpy()
        for k in range(span.first[j + 1] - span.first[j]):
            tokens, mask = exs[span.first[j] + k]
            at = np.flatnonzero(seg == k)
            assert window[at].tolist() == tokens  # whole, in order
            inputs = at[at < len(pos)]
            assert pos[inputs].tolist() == list(range(len(inputs)))  # positions restart at each example
            # a target is scored where the example's mask says so, never across to the next example
            inside = at[:-1]
            assert loss[inside].tolist() == mask[1:]
            if at[-1] < len(loss):
                assert loss[at[-1]] == 0
        seen += list(range(span.first[j], span.first[j + 1]))
        pad = seg[:-1] == span.first[j + 1] - span.first[j]
        assert (loss[pad] == 0).all()
    assert seen == list(range(d.documents))  # every example once, none split


def test_too_long_examples_are_refused_or_truncated_with_a_count(tmp_path):
    d = prepare_rows(tmp_path, [{"instruction": "short", "output": "x"}, {"instruction": "long " * 30, "output": "y"}])
    with pytest.raises(DataError, match=r"1 of 2 examples are longer than model.seq_length \+ 1 = 65 tokens "
                                        r"\(the longest has 177\).*data.truncate=true"):
        loader([d])
    data = loader([d], truncate=True)
    assert data.train[0].truncated == 1 and "1 train examples longer" in data.notes[0]
    batch = data.samples(data.train, np.array([0, 0]), np.array([0, 1]), shuffle=False)
    assert batch.segments[1].unique().tolist() == [0]  # the truncated example fills its sample alone


def test_instruction_and_text_sources_blend(tmp_path):
    from tests.unit.test_data import make_dataset

    text = make_dataset(tmp_path / "text", [f"line {i}" for i in range(200)])
    inst = prepare_rows(tmp_path, qa_rows(60))
    data = ShardData([text, inst], [0.5, 0.5], load_tokenizer(inst.path), seq_length=64, micro_batch_size=4,
                     global_batch_size=8, dp=1, dp_rank=0, seed=1, val_fraction=0)
    batch = data.samples(data.train, np.array([0, 1]), np.array([0, 0]), shuffle=False)
    assert batch.segments[0].unique().tolist() == [0] and batch.loss_mask[0].sum() == 64  # text: all targets
    assert 0 < batch.loss_mask[1].sum() < 64 and len(batch.segments[1].unique()) > 1


def test_packed_examples_score_like_each_example_alone(world1, tmp_path):
    """Through the real megatron model (learned positions, so the restarted position ids matter): every
    example's per-token losses inside a packed sample equal those of the example alone (1e-5), and the
    masked loss counts exactly its output tokens."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import ModelConfig
    from gorilla_dist.loss import per_token_loss
    from gorilla_dist.model import build_model

    d = prepare_rows(tmp_path, qa_rows(30))
    data, alone = loader([d], seq=128), loader([d], seq=128, pack=False)
    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=128, position_embedding="learned_absolute"))
    model = build_model(m, vocab_size=d.vocab_size, dtype="fp32", device=world1.device, seed=3).eval()
    span = data.train[0]
    j = next(j for j in range(span.samples) if span.first[j + 1] - span.first[j] >= 3)
    packed = data.samples(data.train, np.array([0]), np.array([j]), shuffle=False)
    with torch.no_grad():
        lp = per_token_loss(model, packed)[0] * packed.loss_mask[0]
        for k in range(span.first[j + 1] - span.first[j]):
            single = alone.samples(alone.train, np.array([0]), np.array([span.first[j] + k]), shuffle=False)
            ls = per_token_loss(model, single)[0] * single.loss_mask[0]
            at = np.flatnonzero(packed.segments[0].numpy() == k)
            torch.testing.assert_close(lp[at], ls[:len(at)], rtol=1e-5, atol=1e-5)
            assert single.loss_mask[0].sum() == sum(examples(d)[span.first[j] + k][1])  # outputs + <eod>
        causal = per_token_loss(model, packed.__class__(**{**packed.__dict__, "segments": None}))[0]
    assert (causal * packed.loss_mask[0] - lp).abs().max() > 1e-3  # without the segments, examples leak


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_starts_as_the_base_and_merges_into_the_same_outputs(world1):
    """B = 0 at start: the adapted model computes the base model bitwise. With trained (here random)
    adapters, the merged plain model W + alpha/r B A gives the adapted model's logits (1e-5)."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import FinetuneConfig, ModelConfig
    from gorilla_dist.finetune import apply_finetune, lora_scale
    from gorilla_dist.model import build_model
    from gorilla_dist.model.deltas import merged

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=32))
    f = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), dict(method="lora", lora=dict(rank=4, alpha=8.0)))
    base = build_model(m, vocab_size=40, dtype="fp32", device=world1.device, seed=3).eval()
    adapted = build_model(m, vocab_size=40, dtype="fp32", device=world1.device, seed=3, finetune=f).eval()
    summary = apply_finetune(adapted, f)
    assert "rank 4 adapters on 8 linears" in summary
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    ids = torch.randint(0, 40, (2, 32))
    pos = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        assert torch.equal(adapted(ids, pos, None), base(ids, pos, None))
        for n, p in adapted.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.1)
        lora_logits = adapted(ids, pos, None)
        weights = merged({n: p.detach().clone() for n, p in adapted.named_parameters()}, "lora", lora_scale(f))
        assert weights.keys() == dict(base.named_parameters()).keys()
        for n, p in base.named_parameters():
            p.copy_(weights[n])
        torch.testing.assert_close(base(ids, pos, None), lora_logits, rtol=1e-5, atol=1e-5)


# -- prompt tuning ------------------------------------------------------------------------------------

def prompt_model(world1, n=5, **model):
    from omegaconf import OmegaConf

    from gorilla_dist.config import FinetuneConfig, ModelConfig
    from gorilla_dist.finetune import apply_finetune
    from gorilla_dist.model import build_model

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), dict(name="t", num_layers=2, hidden_size=64, num_heads=4,
                        seq_length=128, **model))
    f = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), dict(method="prompt", virtual_tokens=n))
    net = build_model(m, vocab_size=257, dtype="fp32", device=world1.device, seed=3, finetune=f).eval()
    assert "5 virtual tokens; 1 of" in apply_finetune(net, f)
    with torch.no_grad():
        net.soft_prompt.weight.normal_()
    return net


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_prompt_tuning_computes_the_model_on_the_prompt_and_the_tokens(world1, tmp_path, position):
    """The hooks compute megatron's model on [prompt; token embeddings] (the reference, built by hand
    here), one output per token; an example's segment ids let it see the prompt (segment -1)."""
    from gorilla_dist.loss import per_token_loss

    model = prompt_model(world1, position_embedding=position)
    d = prepare_rows(tmp_path, qa_rows(30))
    packed = loader([d], seq=128, pack=True)  # (several examples: segment ids)
    single = packed.samples(packed.train, np.array([0]), np.array([0]), shuffle=False)
    with torch.no_grad():
        emb = model.embedding(input_ids=single.tokens, position_ids=single.position_ids)
        full = torch.cat([model.soft_prompt.weight[:, None], emb])
        pre, post = model._forward_pre_hooks.copy(), model._forward_hooks.copy()
        model._forward_pre_hooks.clear()
        model._forward_hooks.clear()
        ref = model(None, None, None, decoder_input=full)[0, 5:]  # (s, vocab) without the hooks
        model._forward_pre_hooks.update(pre)
        model._forward_hooks.update(post)
        torch.testing.assert_close(model(single.tokens, single.position_ids, None)[0], ref, rtol=1e-5, atol=1e-5)
        labels = single.labels[0]
        ref_loss = torch.nn.functional.cross_entropy(ref[:, :257], labels, reduction="none")
        # segments (the later examples are other segments) change nothing for the first example
        at = np.flatnonzero(single.segments[0].numpy() == 0)
        torch.testing.assert_close(per_token_loss(model, single)[0][at], ref_loss[at], rtol=1e-5, atol=1e-5)
        model.soft_prompt.weight.zero_()
        other = model(single.tokens, single.position_ids, None)[0, :, :257]
        assert (other - ref[:, :257]).abs().max() > 1e-3  # the prompt matters


def test_prompt_tuning_generates_the_same_tokens_with_a_kv_cache(world1):
    from gorilla_dist.inference import Decoder, sample_ids

    model = prompt_model(world1)
    prompt = torch.randint(0, 257, (1, 6), generator=torch.Generator().manual_seed(1))
    a = sample_ids(model, prompt, vocab_size=257, max_new_tokens=20, seq_length=128, temperature=0, cache=True)
    b = sample_ids(model, prompt, vocab_size=257, max_new_tokens=20, seq_length=128, temperature=0, cache=False)
    assert torch.equal(a, b)
    ids = torch.randint(0, 257, (1, 20), generator=torch.Generator().manual_seed(2))
    cached, plain = Decoder(model, 128, cache=True), Decoder(model, 128, cache=False)
    with torch.no_grad():
        for t in range(6, 21):  # the prompt is in the cache: each step's logits are the uncached model's
            torch.testing.assert_close(cached.logits(ids[:, :t]), plain.logits(ids[:, :t]), rtol=1e-5, atol=1e-5)


def test_shots_are_other_training_examples_drawn_deterministically(tmp_path):
    from gorilla_dist.evaluate import _shots

    d = prepare_rows(tmp_path, qa_rows(30))
    exs = examples(d)
    def split(tokens) -> list[int]:  # back into whole examples of the pool
        pieces, rest = [], tokens.tolist()
        while rest:
            i = next(i for i in range(25) if rest[:len(exs[i][0])] == exs[i][0])
            pieces.append(i)
            rest = rest[len(exs[i][0]):]
        return pieces

    tokens, left_out = _shots(d, 27, 3, (0, 25), room=10_000)
    again, _ = _shots(d, 27, 3, (0, 25), room=10_000)
    assert left_out == 0 and tokens.tolist() == again.tolist() and len(set(split(tokens))) == 3
    everything, _ = _shots(d, 5, 30, (0, 25), room=10_000)
    assert sorted(split(everything)) == [i for i in range(25) if i != 5]  # never the example itself
    few, left_out = _shots(d, 5, 3, (0, 25), room=max(len(e[0]) for e in exs) + 1)
    assert left_out == 2 and len(split(few)) == 1


def test_prompt_and_prefix_tuning_refuse_packed_examples(tmp_path):
    from types import SimpleNamespace

    from gorilla_dist.errors import ConfigError
    from gorilla_dist.finetune import check_finetune_data

    d = prepare_rows(tmp_path, qa_rows(5))
    for method in ("prompt", "prefix"):
        with pytest.raises(ConfigError, match="set data.pack=false"):
            check_finetune_data(SimpleNamespace(method=method), SimpleNamespace(pack=True), [d])
        check_finetune_data(SimpleNamespace(method=method), SimpleNamespace(pack=False), [d])
    check_finetune_data(SimpleNamespace(method="lora"), SimpleNamespace(pack=True), [d])
