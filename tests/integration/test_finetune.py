"""Fine-tuning on instruction data through the launcher: a base run, instruction data prepared with its
tokenizer, then finetune.method=freeze and lora. Frozen parameters stay bitwise the base's and hold no
optimizer state; adapter checkpoints hold the trainable parameters only; ZeRO-3 on 2 ranks (freeze), TP=2
with sequence parallelism and ZeRO-2 (LoRA) equal 1 process; a stopped run resumes bitwise; a changed or
missing base is refused; generate and export read the adapter checkpoint merged onto its base, and the
exported LoRA model computes our adapted model's logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, check, generate, launch, losses, metrics
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

    from gorilla_dist.checkpoint import checkpoint_weights

    base_ckpt, ckpt = base / "base" / "checkpoints" / "step_00000010", tuned / "checkpoints" / "step_00000010"
    before, saved, moments = load_file(str(base_ckpt / "model.safetensors")), load_file(
        str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors"))
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


def test_an_adapter_run_resumes_bitwise_and_generate_and_export_read_it(base, tuned, tmp_path):
    run = tmp_path / "split"
    check(tune(base, run, "train.max_steps=5", "checkpoint.interval=0"))
    out = check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0"))
    assert "resumed from" in out and "weights from" not in out
    assert losses(run) == losses(tuned)  # exact float equality
    check(generate(tuned, "prompt=Instruction:", "max_new_tokens=8"))
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.export", f"run.dir={tuned}", f"out={tmp_path / 'hf'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.export", f"run.dir={tuned}", f"out={tmp_path / 'p'}",
                           "format=peft"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "finetune.method=freeze; use format=merged" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_a_changed_or_missing_base_is_refused(base, tmp_path):
    import shutil

    copy = tmp_path / "base_copy"
    shutil.copytree(base / "base" / "checkpoints" / "step_00000010", copy)
    run = tmp_path / "run"
    check(tune(base, run, "train.max_steps=2", init_from=copy))
    # other weights in the base's place (a complete, valid checkpoint: its manifest matches them)
    from safetensors.torch import save_file

    weights = load_file(str(copy / "model.safetensors"))
    weights["decoder.final_layernorm.weight"] += 1.0
    save_file(weights, str(copy / "model.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": (copy / "model.safetensors").stat().st_size,
                                              "sha256": sha256_file(copy / "model.safetensors")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = tune(base, run, "train.max_steps=4", init_from=copy)
    assert proc.returncode == 1 and "a different base" in proc.stdout, proc.stdout[-3000:]
    shutil.rmtree(copy)
    proc = tune(base, run, "train.max_steps=4", init_from=copy)
    assert proc.returncode == 1 and "the directory is gone" in proc.stdout, proc.stdout[-3000:]


@pytest.fixture(scope="module")
def lora(base):
    run = base / "lora"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0", method=LORA))
    return run


def test_lora_on_tp2_with_sequence_parallelism_equals_one_process(base, lora, tmp_path):
    run = tmp_path / "tp2-sp"
    check(tune(base, run, "train.max_steps=10", "checkpoint.interval=0", "launch=torchrun", "launch.nproc_per_node=2",
               "parallel.tp=2", "parallel.sequence_parallel=true", method=LORA))
    one, two = losses(lora), losses(run)
    assert one.keys() == two.keys() and all(two[s] == pytest.approx(one[s], rel=1e-5) for s in one)
    a = load_file(str(lora / "checkpoints" / "step_00000010" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step_00000010" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(k.endswith((".lora_A", ".lora_B")) for k in a)
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


LLAMA = ["model.normalization=RMSNorm", "model.activation=swiglu", "model.num_query_groups=2"]


@pytest.fixture(scope="module")
def llama_base(base):
    run = base / "llama_base"
    check(launch(run, *COMMON, *LLAMA, "train.max_steps=2"))
    return run


def export(run: Path, out: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.export", f"run.dir={run}", f"out={out}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("model", ["debug", "llama"])
def test_lora_export_merged_and_as_a_peft_adapter_computes_the_adapted_logits(world1, base, lora, tmp_path, model,
                                                                              request):
    """The merged transformers model, and PEFT's LoRA loaded onto the exported base, compute our adapted
    model's logits (1e-4): GPT-NeoX's fused query_key_value (the debug model), and Llama's q/k/v and
    gate/up split out of megatron's fused linears (grouped-query attention)."""
    import peft
    import torch
    import transformers

    from helpers import trained_model

    if model == "llama":  # a Llama-shaped base and its LoRA run
        src, run = request.getfixturevalue("llama_base"), tmp_path / "lora"
        check(tune(base, run, *LLAMA, "train.max_steps=3", "finetune.lora.targets=[linear_qkv,linear_fc1,linear_fc2]",
                   init_from=src, method=LORA))
    else:
        src, run = base / "base", lora
        steps = losses(lora)
        assert steps[10] < steps[1] - 0.15  # the adapters learn the task
    export(run, tmp_path / "merged")
    export(src, tmp_path / "base_hf")
    export(run, tmp_path / "adapter", "format=peft")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 16.0
    model, tok, _ = trained_model(world1, run)  # the base model with the run's LoRA hooks and adapters
    ids = torch.as_tensor(tok.encode("Instruction:\nWho speaks?\n\nResponse:\n"))[None]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size]
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(with_adapter(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)
        base_model, _, _ = trained_model(world1, base / "base")
        assert (base_model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size] - ours).abs().max() > 1e-2


def test_evaluate_reports_output_only_loss_and_exact_match(world1, base, lora, tmp_path):
    """evaluate on instruction data: the loss over output tokens only and the exact match of greedy
    outputs, equal to a recomputation here (the uncached generation as the second path)."""
    import numpy as np
    import torch

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
    """The whole path with a task a tiny model can learn in 40 steps: every row's output is "Nobody.";
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
                 "optim.lr=1e-2", "train.max_steps=40"))
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
    assert shot["exact_match"] == 1.0 and abs(shot["loss"] - result["loss"]) > 1e-5


def test_prompt_tuning_trains_the_virtual_tokens_only_and_exports_a_peft_prompt(world1, base, tmp_path):
    """A prompt-tuning run (one example per sample) holds the virtual tokens only, and PEFT's prompt tuning
    on the exported base computes our logits (1e-4)."""
    import peft
    import torch
    import transformers

    from helpers import trained_model

    method = ["finetune.method=prompt", "finetune.virtual_tokens=6", "finetune.init_text=Who speaks", "data.pack=false",
              "optim.lr=3e-2"]
    packed = tune(base, tmp_path / "packed", "train.max_steps=1", method=method[:-2])
    assert packed.returncode == 2 and "set data.pack=false" in packed.stdout
    run = tmp_path / "prompt"
    check(tune(base, run, "train.max_steps=6", "checkpoint.interval=0", method=method))
    assert losses(run)[6] < losses(run)[1]
    saved = load_file(str(run / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert list(saved) == ["soft_prompt.weight"] and saved["soft_prompt.weight"].shape == (6, 64)
    export(base / "base", tmp_path / "base_hf")
    export(run, tmp_path / "adapter", "format=peft")
    model, tok, _ = trained_model(world1, run)
    ids = torch.as_tensor(tok.encode("Instruction:\nWho speaks?\n\nResponse:\n"))[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
    with_prompt = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size]
        theirs = with_prompt(input_ids=ids).logits[:, 6:]  # (PEFT returns the virtual tokens' outputs too)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


PREFIX = ["finetune.method=prefix", "finetune.virtual_tokens=4", "data.pack=false", "optim.lr=1e-2"]


def test_prefix_tuning_through_an_mlp_on_tp2_equals_one_process(base, tmp_path):
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


@pytest.mark.parametrize("model", ["debug", "llama"])
def test_prefix_tuning_exports_a_peft_prefix_with_the_same_logits(world1, base, tmp_path, model, request):
    """PEFT's prefix tuning (a key/value cache of N positions) on the exported base computes our logits:
    the tokens' rotary positions start at N, the prefix keys are used as learned (GPT-NeoX's debug model,
    and Llama with grouped-query attention)."""
    import peft
    import torch
    import transformers

    from helpers import trained_model

    # the direct prefixes on the debug model, the MLP-computed ones on Llama
    method = [*PREFIX, f"finetune.prefix_projection={16 if model == 'llama' else 0}"]
    src, arch = (request.getfixturevalue("llama_base"), LLAMA) if model == "llama" else (base / "base", [])
    run = tmp_path / "prefix"
    check(tune(base, run, *arch, "train.max_steps=3", init_from=src, method=method))
    export(src, tmp_path / "base_hf")
    export(run, tmp_path / "adapter", "format=peft")
    ours_model, tok, _ = trained_model(world1, run)
    ids = torch.as_tensor(tok.encode("Instruction:\nWho speaks?\n\nResponse:\n"))[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
    with_prefix = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = ours_model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size]
        torch.testing.assert_close(with_prefix(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_fine_tuning_starts_from_a_hugging_face_model(world1, tmp_path):
    """checkpoint.init_from=hf:<dir> through the launcher: the architecture comes from config.json, the data
    must use the model's tokenizer, the saved model computes transformers' logits (lr=0), and a LoRA run on
    it records the transformers directory as its base (generate reads it back)."""
    import torch

    from helpers import trained_model
    from tests.unit.test_hf_import import hf_model

    directory, hf = hf_model(tmp_path, "llama-gqa")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text()[:200_000])
    data = [f"data.path={corpus}", f"data.tokenizer={directory}", "model=debug", "model.seq_length=64",
            f"checkpoint.init_from=hf:{directory}"]
    wrong = launch(tmp_path / "wrong", *data[:-1], "data.tokenizer=byte", f"checkpoint.init_from=hf:{directory}",
                   "train.max_steps=1")
    assert wrong.returncode == 1 and "was not prepared with the model's tokenizer" in wrong.stdout
    run = tmp_path / "frozen"
    out = check(launch(run, *data, "optim.lr=0", "optim.min_lr=0", "train.max_steps=1"))
    assert f"weights from hf:{directory}" in out
    model, tok, m = trained_model(world1, run)
    assert (m.num_query_groups, m.normalization, m.norm_eps, m.rotary_base) == (2, "RMSNorm", 1e-6, 500000)
    ids = torch.randint(0, tok.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.arange(40)[None], None)[..., :tok.vocab_size],
                                   hf(input_ids=ids).logits[..., :tok.vocab_size], rtol=1e-4, atol=1e-4)
    lora = tmp_path / "lora"
    check(launch(lora, *data, *LORA, "train.max_steps=2"))
    base = json.loads((lora / "checkpoints" / "step_00000002" / "base.json").read_text())
    assert base["path"] == f"hf:{directory.resolve()}"
    check(generate(lora, "prompt=The ", "max_new_tokens=5"))
