"""Fine-tuning on instruction data through the launcher: a base run, instruction data prepared with its
tokenizer, then finetune.method=freeze and lora. Frozen parameters stay bitwise the base's and hold no
optimizer state; adapter checkpoints hold the trainable parameters only; ZeRO-3 on 2 ranks (freeze), TP=2
with sequence parallelism and ZeRO-2 (LoRA) equal 1 process; a stopped run resumes bitwise; a changed or
missing base is refused; generate and export read the adapter checkpoint merged onto its base, and the
exported LoRA model computes our adapted model's logits."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_no_host_syncs, check, launch, losses, metrics
from omegaconf import OmegaConf
from safetensors.torch import load_file

from gorilla_dist.data.loader import bundled_corpus
from gorilla_dist.files import sha256_file

COMMON = ["model=debug", "model.seq_length=128", "optim.warmup_steps=2", "optim.decay_steps=10", "checkpoint.keep=0"]
TRAINABLE = r"decoder\.layers\.1\."


def speaker_rows(n: int = 300) -> list[dict]:
    """Who speaks a speech of the bundled corpus (its first 60 characters)."""
    rows = []
    for para in bundled_corpus().read_text().split("\n\n"):
        speaker, _, speech = para.partition(":\n")
        if speech and len(rows) < n:
            rows.append({"instruction": "Who speaks?", "input": speech[:60], "output": speaker})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    check(launch(root / "base", *COMMON, "train.max_steps=10", "checkpoint.interval=10"))
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in speaker_rows()))
    subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", f"input={rows}", f"output={root / 'inst'}",
                    "format=instruction", f"tokenizer={root / 'base' / 'tokenizer.json'}", "workers=1",
                    "progress=false"], cwd=REPO, check=True, capture_output=True)
    return root


FREEZE = ["finetune.method=freeze", f"finetune.trainable=[{TRAINABLE}]"]
LORA = ["finetune.method=lora", "finetune.lora.rank=4", "optim.lr=3e-3"]


def tune(base: Path, run: Path, *extra: str, init_from: Path | None = None, method=FREEZE):
    return launch(run, *COMMON, f"data.sources=[{{path: {base / 'inst'}}}]",
                  f"checkpoint.init_from={init_from or base / 'base'}", *method, *extra)


@pytest.fixture(scope="module")
def tuned(base):
    run = base / "tuned"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0"))
    return run


def test_frozen_parameters_stay_the_bases_and_hold_no_optimizer_state(base, tuned):
    import re

    from gorilla_dist.checkpoint import checkpoint_moments, checkpoint_weights, own_weights

    base_ckpt, ckpt = base / "base" / "checkpoints" / "step_00000010", tuned / "checkpoints" / "step_00000010"
    before, saved, moments = load_file(str(base_ckpt / "model.safetensors")), load_file(
        str(ckpt / "model.safetensors")), checkpoint_moments(ckpt)
    assert own_weights(ckpt).keys() == saved.keys()  # the shards hold the same: trainable parameters only
    trainable = sorted(k for k in before if re.search(TRAINABLE, k))
    assert sorted(saved) == trainable  # the adapter checkpoint: trainable parameters only
    assert sorted(moments) == sorted(f"{k}.{m}" for k in trainable for m in ("exp_avg", "exp_avg_sq"))
    assert json.loads((ckpt / "base.json").read_text())["path"] == str(base_ckpt.resolve())
    merged = checkpoint_weights(ckpt)
    assert sorted(merged) == sorted(before)
    for name, value in merged.items():
        if name in saved:
            assert not value.equal(before[name]), name  # trained
        else:
            assert value.equal(before[name]), name  # frozen: bitwise the base's
    n = sum(v.numel() for v in saved.values())
    assert (ckpt / "model.safetensors").stat().st_size < 4 * n + 4096  # no copy of the base
    # the memory report: no gradient or optimizer state for frozen parameters
    [first] = [r["ranks"][0] for r in metrics(tuned, memory=True) if r.get("memory") == "first_step"]
    [full] = [r["ranks"][0] for r in metrics(base / "base", memory=True) if r.get("memory") == "first_step"]
    assert first["grads"] == 4 * n and 8 * n <= first["optimizer"] < 8 * n + 1024  # AdamW: 2 moments (+ step counts)
    assert full["grads"] == first["params"] > 2 * first["grads"]


def test_freeze_on_2_ranks_zero3_equals_one_process(base, tuned, tmp_path):
    run = tmp_path / "zero3"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0", "launch=torchrun", "launch.nproc_per_node=2",
               "parallel.zero_stage=3"))
    one, two = losses(tuned), losses(run)
    assert one.keys() == two.keys() and all(two[s] == pytest.approx(one[s], rel=1e-5) for s in one)
    a = load_file(str(tuned / "checkpoints" / "step_00000010" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_00000010" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_an_adapter_run_resumes_bitwise(base, tuned, tmp_path):
    run = tmp_path / "split"
    check(tune(base, run, "train.max_steps=5", "checkpoint.interval=0"))
    out = check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0"))
    assert "resumed from" in out and "weights from" not in out
    assert losses(run) == losses(tuned)  # exact float equality


def test_a_changed_or_missing_base_is_refused(base, tuned, tmp_path):
    """The tuned run's checkpoint, pointed at a copy of its base that then changes or disappears."""
    import shutil

    from safetensors.torch import save_file

    from gorilla_dist.checkpoint import checkpoint_weights
    from gorilla_dist.errors import CheckpointError

    copy, ckpt = tmp_path / "base_copy", tmp_path / "adapter"
    shutil.copytree(base / "base" / "checkpoints" / "step_00000010", copy)
    shutil.copytree(tuned / "checkpoints" / "step_00000010", ckpt)
    (ckpt / "base.json").write_text(json.dumps({**json.loads((ckpt / "base.json").read_text()), "path": str(copy)}))
    assert len(checkpoint_weights(ckpt)) > len(load_file(str(ckpt / "model.safetensors")))
    weights = load_file(str(copy / "model.safetensors"))  # other weights, in a valid checkpoint
    weights["decoder.final_layernorm.weight"] += 1.0
    save_file(weights, str(copy / "model.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": (copy / "model.safetensors").stat().st_size,
                                              "sha256": sha256_file(copy / "model.safetensors")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="a different base"):
        checkpoint_weights(ckpt)
    shutil.rmtree(copy)
    with pytest.raises(CheckpointError, match="the directory is gone"):
        checkpoint_weights(ckpt)


@pytest.fixture(scope="module")
def lora(base):
    run = base / "lora"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0", "logging.count_syncs=true", method=LORA))
    return run


def test_lora_learns_and_on_tp2_with_sequence_parallelism_equals_one_process(base, lora, tmp_path):
    run = tmp_path / "tp2-sp"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0", "launch=torchrun", "launch.nproc_per_node=2",
               "parallel.tp=2", "parallel.sequence_parallel=true", "logging.count_syncs=true", method=LORA))
    for r in (lora, run):  # packed instruction examples (segment ids, output-only loss) read nothing per step
        assert_no_host_syncs(r, min_steps=2)
    one, two = losses(lora), losses(run)
    assert one[10] < one[1] - 0.15  # the adapters learn the task
    assert one.keys() == two.keys() and all(two[s] == pytest.approx(one[s], rel=1e-5) for s in one)
    a = load_file(str(lora / "checkpoints" / "step_00000010" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_00000010" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(k.endswith((".lora_A", ".lora_B")) for k in a)
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def export(run: Path, out: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.export", f"run.dir={run}", f"out={out}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def base_hf(base) -> Path:
    """The base run exported to transformers once, for the tests that load adapters onto it."""
    export(base / "base", base / "base_hf")
    return base / "base_hf"


def check_generate(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def logits_equal(world1, run: Path, hf_model, *, tol: float = 1e-4, skip: int = 0):
    """Our model of `run` (its adapters included) and a transformers model give the same logits."""
    import torch

    from helpers import trained_model

    model, tok, _ = trained_model(world1, run)
    ids = torch.as_tensor(tok.encode("Instruction:\nWho speaks?\n\nResponse:\n"))[None]
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size]
        theirs = hf_model(input_ids=ids).logits[:, skip:, :tok.vocab_size]
    torch.testing.assert_close(theirs, ours, rtol=tol, atol=tol)
    return ours


def test_evaluate_reports_output_only_loss_and_exact_match(world1, base, lora, tmp_path):
    """evaluate on instruction data: the loss over output tokens only and the exact match of greedy
    outputs, equal to a recomputation here (the uncached generation as the second path)."""
    import numpy as np

    from gorilla_dist.data.dataset import TokenDataset
    from gorilla_dist.inference import sample_ids
    from helpers import trained_model

    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.evaluate", f"run.dir={lora}", f"data={base / 'inst'}",
                           "samples=8", f"out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["sources"][str(base / "inst")]
    model, tok, _ = trained_model(world1, lora)
    ds = TokenDataset(base / "inst")
    loss_sum, count, exact = 0.0, 0, 0
    with torch.no_grad():
        for j in range(8):
            a, b = int(ds.offsets[j]), int(ds.offsets[j + 1])
            tokens, mask = torch.as_tensor(ds.read(a, b).astype(np.int64)), ds.read(a, b, mask=True)
            logits = model(tokens[None, :-1], torch.arange(b - a - 1)[None], None)[0, :, :tok.vocab_size]
            losses = torch.nn.functional.cross_entropy(logits.double(), tokens[1:], reduction="none")
            loss_sum += float((losses * torch.as_tensor(mask[1:], dtype=torch.float64)).sum())
            count += int(mask[1:].sum())
            first = int(np.argmax(mask))  # one output per row: the prompt is what comes before it
            ids = sample_ids(model, tokens[None, :first], vocab_size=tok.vocab_size, max_new_tokens=b - a - first,
                             seq_length=128, temperature=0, cache=False, stop=tok.eod)
            exact += int(ids[0, first:].tolist() == tokens[first:].tolist())
    assert result["tokens"] == count and result["generated"] == 8
    assert result["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert result["exact_match"] == exact / 8



def test_full_fine_tuning_learns_a_fixed_answer_to_exact_match(base, tmp_path):
    """The whole path with a task a tiny model can learn in 50 steps: every row's output is "Nobody.";
    greedy generation then reproduces it (and its <eod>) on held-out examples."""
    rows = tmp_path / "const.jsonl"
    rows.write_text("".join(json.dumps({**r, "input": r["input"][:16], "output": "Nobody."}) + "\n"
                            for r in speaker_rows()))
    subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", f"input={rows}", f"output={tmp_path / 'const'}",
                    "format=instruction", f"tokenizer={base / 'base' / 'tokenizer.json'}", "workers=1",
                    "progress=false"], cwd=REPO, check=True, capture_output=True)
    run = tmp_path / "run"
    common = [o for o in COMMON if not o.startswith(("optim.decay_steps", "model.seq_length"))]
    common.append("model.seq_length=256")  # (rotary positions: the base's weights fit any length)
    check(launch(run, *common, f"data.sources=[{{path: {tmp_path / 'const'}}}]", f"checkpoint.init_from={base / 'base'}",
                 "optim.lr=5e-3", "train.max_steps=50"))
    results = {}
    for shots in (0, 2):  # k-shot: the same targets scored, after 2 training examples (context only)
        proc = subprocess.run([sys.executable, "-m", "gorilla_dist.evaluate", f"run.dir={run}", "samples=10",
                               f"shots={shots}", f"out={tmp_path / f'eval{shots}.json'}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[shots] = json.loads((tmp_path / f"eval{shots}.json").read_text())
    result, shot = results[0], results[2]
    assert result["split"] == "validation" and result["exact_match"] == 1.0 and result["loss"] < 0.2
    assert shot["tokens"] == result["tokens"] and shot["shots"] == 2 and shot["shots_left_out"] == 0
    assert shot["shots_used"] == 2 * 10  # every evaluated example got its 2 shots: the prompts changed
    assert shot["exact_match"] == 1.0 and abs(shot["loss"] - result["loss"]) > 1e-5


def test_evaluate_never_reports_a_number_over_nothing(base, tmp_path):
    """The base (model.seq_length=128) on its instruction rows: 3 shots cannot fit beside an example of ~100
    tokens, so 3-shot numbers would equal 0-shot's: an error. Examples whose prompts alone are longer than
    seq_length leave no scored token: an error, not `loss 0.0000 (0 tokens)`."""
    def evaluate(data, *args):
        return subprocess.run([sys.executable, "-m", "gorilla_dist.evaluate", f"run.dir={base / 'base'}", f"data={data}",
                               "samples=4", *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    proc = evaluate(base / "inst", "shots=3")
    assert proc.returncode == 1 and "shots=3: no shot fits" in proc.stderr, proc.stderr
    assert "12 shots left out" in proc.stderr and "Traceback" not in proc.stderr
    rows = tmp_path / "long.jsonl"
    rows.write_text("".join(json.dumps({**r, "input": r["input"].ljust(300)}) + "\n" for r in speaker_rows(8)))
    proc = evaluate(rows, "format=instruction")
    assert proc.returncode == 1 and "no scored token in its 4 samples: every example's prompt is longer than " \
        "model.seq_length=128" in proc.stderr, proc.stderr
    proc = evaluate(tmp_path / "nope")
    assert proc.returncode == 1 and f"data={tmp_path / 'nope'}: {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "input=" not in proc.stderr


def test_prompt_tuning_trains_the_virtual_tokens_only_and_exports_a_peft_prompt(world1, base, base_hf, tmp_path):
    """A prompt-tuning run (one example per sample) holds the virtual tokens only, and PEFT's prompt tuning
    on the exported base computes our logits (1e-4)."""
    import peft
    import transformers

    method = ["finetune.method=prompt", "finetune.virtual_tokens=6", "finetune.init_text=Who speaks", "data.pack=false",
              "optim.lr=3e-2"]
    run = tmp_path / "prompt"
    check(tune(base, run, "train.max_steps=6", "checkpoint.interval=0", method=method))
    assert losses(run)[6] < losses(run)[1]
    saved = load_file(str(run / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert list(saved) == ["soft_prompt.weight"] and saved["soft_prompt.weight"].shape == (6, 64)
    export(run, tmp_path / "adapter", "format=peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    logits_equal(world1, run, peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), skip=6)


PREFIX = ["finetune.method=prefix", "finetune.virtual_tokens=4", "data.pack=false", "optim.lr=1e-2"]


def test_prefix_tuning_through_an_mlp_on_tp2_equals_one_process_and_exports_to_peft(world1, base, base_hf, tmp_path):
    """The MLP-computed prefixes: TP2 + SP equals one process; PEFT's prefix tuning (a key/value cache of N
    positions: the tokens' rotary positions start at N) on the exported base computes our logits."""
    import peft
    import transformers

    method = [*PREFIX, "finetune.prefix_projection=32"]
    one, two = tmp_path / "one", tmp_path / "tp2"
    check(tune(base, one, "train.max_steps=6", "checkpoint.interval=0", method=method))
    check(tune(base, two, "train.max_steps=6", "checkpoint.interval=0", "launch=torchrun", "launch.nproc_per_node=2",
               "parallel.tp=2", "parallel.sequence_parallel=true", method=method))
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    assert a[6] != a[1]
    wa = load_file(str(one / "checkpoints" / "step_00000006" / "model.safetensors"))
    wb = load_file(str(two / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert sorted(wa) == sorted(wb) and all(k.startswith("prefix.") for k in wa)
    assert all((wa[k] - wb[k]).abs().max() < 1e-5 for k in wa)
    export(one, tmp_path / "adapter", "format=peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    logits_equal(world1, one, peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval())


def test_a_hugging_face_llama_fine_tuned_with_lora_and_prefix_exports_back_to_peft(world1, tmp_path):
    """checkpoint.init_from=hf:<dir> through the launcher, on a random transformers Llama with grouped-query
    attention: the architecture comes from config.json, the data must use the model's tokenizer; a LoRA
    run (q/k/v and gate/up split out of megatron's fused linears) and a prefix run (direct prefixes) record
    the transformers directory as their base, and PEFT loads their exported adapters onto that very model
    with our logits (1e-4); the merged LoRA export computes them too."""
    import peft
    import transformers

    from tests.unit.test_hf_import import hf_model

    directory, _ = hf_model(tmp_path, "llama-gqa")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text()[:100_000])
    data = [f"data.path={corpus}", f"data.tokenizer={directory}", "model=debug", "model.seq_length=64",
            f"checkpoint.init_from=hf:{directory}"]
    lora, prefix = tmp_path / "lora", tmp_path / "prefix"
    out = check(launch(lora, *data, *LORA, "train.max_steps=2", "finetune.lora.targets=[linear_qkv,linear_fc1]"))
    assert f"weights from hf:{directory}" in out
    check(launch(prefix, *data, *PREFIX, "train.max_steps=2"))
    base = json.loads((lora / "checkpoints" / "step_00000002" / "base.json").read_text())
    assert base["path"] == f"hf:{directory.resolve()}"
    from helpers import trained_model

    _, _, m = trained_model(world1, lora)
    assert (m.num_query_groups, m.normalization, m.norm_eps, m.rotary_base) == (2, "RMSNorm", 1e-6, 500000)
    for run in (lora, prefix):
        export(run, tmp_path / f"{run.name}_adapter", "format=peft")
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        logits_equal(world1, run, peft.PeftModel.from_pretrained(hf, tmp_path / f"{run.name}_adapter").eval())
    export(lora, tmp_path / "merged")
    logits_equal(world1, lora, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                                                 dtype=torch.float32))


HEAD = ["finetune.head=classification", "finetune.method=freeze", f"finetune.trainable=[{TRAINABLE}]", "optim.lr=1e-2",
        "train.eval_interval=4", "train.eval_samples=24"]


@pytest.fixture(scope="module")
def labelled(base, tmp_path_factory) -> Path:
    """The speaker rows as labelled examples (the speaker is the label, no output), prepared."""
    tmp = tmp_path_factory.mktemp("labelled")
    rows = tmp / "labelled.jsonl"
    rows.write_text("".join(json.dumps({"instruction": r["instruction"], "input": r["input"][:30], "label": r["output"]})
                            + "\n" for r in speaker_rows()))
    data = tmp / "labelled"
    subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", f"input={rows}", f"output={data}",
                    "format=instruction", f"tokenizer={base / 'base' / 'tokenizer.json'}", "workers=1",
                    "progress=false"], cwd=REPO, check=True, capture_output=True)
    return data


def test_a_classification_head_on_the_last_of_two_pipeline_stages_equals_one_process(base, labelled, tmp_path):
    """The head lives on the last stage (4 micro-batches through 2 stages in 1F1B); both stages report the whole
    model's fine-tuning summary. Measured: losses within 4.8e-7, validation loss within 3e-7."""
    common = [f"data.sources=[{{path: {labelled}}}]", f"checkpoint.init_from={base / 'base'}", "train.max_steps=8",
              "checkpoint.interval=0", "train.global_batch_size=8", "train.micro_batch_size=2",
              "finetune.head=classification", "finetune.method=freeze", r"finetune.trainable=[decoder\.layers\.]",
              "optim.lr=1e-2", "train.eval_interval=4", "train.eval_samples=24"]
    one, two = tmp_path / "one", tmp_path / "two"
    summary = "[finetune] freeze: a classification head of 27 classes; 17 of 20 tensors train"
    assert summary in check(launch(one, *COMMON, *common))
    assert summary in check(launch(two, *COMMON, *common, "launch=torchrun", "launch.nproc_per_node=2", "parallel.pp=2"))
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    va, vb = ([r for r in metrics(run) if "val_accuracy" in r] for run in (one, two))
    assert len(va) == len(vb) == 2 and all(x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5) for x, y in zip(va, vb))


def test_a_classification_head_learns_on_tp2_dp2_equals_one_process_evaluates_and_exports(world1, base, labelled,
                                                                                         tmp_path):
    """finetune.head=classification on labelled rows (the speaker is the label, no output): with
    freeze, the head trains beside the selected layer; TP=2 with sequence parallelism x DP=2 (4 ranks)
    equals 1 process; evaluate's accuracy and loss equal a recomputation on each example alone, and
    transformers' *ForSequenceClassification loaded from the export scores the prompt as our model does."""
    import numpy as np
    import transformers

    from gorilla_dist.data.dataset import TokenDataset
    from helpers import trained_model

    data = labelled
    one, four = tmp_path / "one", tmp_path / "four"
    common = [f"data.sources=[{{path: {data}}}]", f"checkpoint.init_from={base / 'base'}", "train.max_steps=8",
              "checkpoint.interval=0", "train.global_batch_size=8", "logging.count_syncs=true", *HEAD]
    out = check(launch(one, *COMMON, *common))
    assert re.search(r"\[finetune\] freeze: a classification head of 27 classes; 9 of 20 tensors", out), out[:3000]
    check(launch(four, *COMMON, *common, "launch=torchrun", "launch.nproc_per_node=4", "parallel.tp=2",
                 "parallel.sequence_parallel=true"))
    a, b = losses(one), losses(four)
    assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    for run in (one, four):  # the classifier's loss picks its labelled positions without reading the device
        assert_no_host_syncs(run, min_steps=2)
    va, vb = ([r for r in metrics(run) if "val_accuracy" in r] for run in (one, four))
    assert [r["val_accuracy"] for r in va] == [r["val_accuracy"] for r in vb] and len(va) == 2
    assert va[-1]["val_loss"] < math.log(27) - 0.3  # the head learns (from chance: ln(classes))
    saved = load_file(str(one / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert "classifier.weight" in saved and all(k == "classifier.weight" or re.search(TRAINABLE, k) for k in saved)

    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.evaluate", f"run.dir={one}", f"out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    model, tok, _ = trained_model(world1, one)
    ds = TokenDataset(data)
    first, right, loss, names = round(ds.documents * 0.9), 0, 0.0, ds.label_names  # data.val_fraction=0.1: the tail
    for i in range(first, ds.documents):
        a_, b_ = int(ds.offsets[i]), int(ds.offsets[i + 1])
        label, at = (int(x) for x in ds.labels[i])
        ids = torch.as_tensor(ds.read(a_, b_ - 1).astype(np.int64))[None]  # (without the trailing <eod>)
        with torch.no_grad():
            scores = model(ids, torch.arange(ids.shape[1])[None], None)[0, at].double()
        right += int(scores.argmax()) == label
        loss += float(torch.nn.functional.cross_entropy(scores, torch.tensor(label)))
    n = ds.documents - first
    assert result["examples"] == n and result["accuracy"] == right / n
    assert result["loss"] == pytest.approx(loss / n, rel=1e-5)
    export(one, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert [hf.config.id2label[i] for i in range(len(names))] == names
    # run.dir/config.yaml names the classes as the checkpoint's config does (the launcher wrote labels: [])
    for run in (one, four):
        assert OmegaConf.load(run / "config.yaml").finetune.labels == names
    ids = torch.as_tensor(ds.read(int(ds.offsets[first]), int(ds.offsets[first + 1])).astype(np.int64))[None]
    with torch.no_grad():  # the whole example, <eod> included: transformers reads the last token before it
        ours = model(ids, torch.arange(ids.shape[1])[None], None)[0, int(ds.labels[first][1])]
        torch.testing.assert_close(hf(input_ids=ids).logits[0], ours, rtol=1e-4, atol=1e-4)
    from helpers import generate  # on a classifier: the prompt's classes, most probable first

    prompt = tok.decode(ds.read(int(ds.offsets[first]), int(ds.offsets[first]) + int(ds.labels[first][1]) + 1).tolist())
    lines = check_generate(generate(one, f"prompt={prompt}"))
    assert [line.split("\t")[0] for line in lines] == [names[i] for i in ours.argsort(descending=True)[:5].tolist()]
