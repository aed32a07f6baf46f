"""Stop + resume equals an uninterrupted run, bit for bit; a broken newest checkpoint is skipped."""

import json
import shutil

import pytest
from helpers import check, launch, metrics

COMMON = ["optim.warmup_steps=2", "optim.decay_steps=20", "train.eval_interval=10", "checkpoint.keep=0"]
LAYOUTS = {
    "local": [],
    "torchrun-zero3": ["launch=torchrun", "launch.nproc_per_node=2", "parallel.zero_stage=3"],
    # the learned layout's scoring parameters are saved and restored; sampling pads to whole blocks
    # dropout inside sequence-parallel regions draws from megatron's per-rank RNG tracker: saved too
    "tp2-sp-dropout": ["launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                       "model.dropout=0.1"],
    "learned-sparse": ["model.attention=learned", "model.seq_length=64", "model.sparse.block_size=16",
                       "model.sparse.topk=2", "train.sample_tokens=20"],
    # shared weights are saved once and tied again on load; each layer's delta is its own
    "shared-layers": ["model.num_layers=4", "model.sharing.unique_layers=2", "model.sharing.pattern=cycle",
                      "model.sharing.lora_rank=4"],
    # experts (saved one by one by global index) and DeepSeek-V3's expert bias (a buffer, saved too)
    "moe-expert-bias": ["model.moe.num_experts=4", "model.moe.router=sigmoid", "model.moe.expert_bias=true",
                        "train.micro_batch_size=6"],
}


@pytest.fixture(scope="module")
def local_straight(tmp_path_factory):
    """One process, 20 steps, checkpoints at 10 and 20: the reference of the local layout and of the tests
    below (which copy it before they change anything)."""
    run = tmp_path_factory.mktemp("local") / "straight"
    check(launch(run, *COMMON, "train.max_steps=20", "checkpoint.interval=10"))
    return run


def stopped_at_10(straight, split) -> None:
    """`split` as the straight run was after its step-10 save: that checkpoint and the first 10 steps' rows."""
    shutil.copytree(straight, split, ignore=shutil.ignore_patterns("step_00000020"))
    rows = (split / "metrics.jsonl").read_text().splitlines(keepends=True)
    (split / "metrics.jsonl").write_text("".join(r for r in rows if json.loads(r)["step"] <= 10))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stop_at_10_and_resume_to_20_equals_straight_20(tmp_path, layout, request):
    """The local layout stops at max_steps=10 and starts again; the others resume from a copy of their
    straight run as it was at step 10 (its checkpoint was saved mid-run: the same save)."""
    split = tmp_path / "split"
    if layout == "local":
        straight = request.getfixturevalue("local_straight")
        check(launch(split, *COMMON, "train.max_steps=10", "checkpoint.interval=0"))
    else:
        straight = tmp_path / "straight"
        check(launch(straight, *COMMON, *LAYOUTS[layout], "train.max_steps=20", "checkpoint.interval=10"))
        stopped_at_10(straight, split)
    out = check(launch(split, *COMMON, *LAYOUTS[layout], "train.max_steps=20", "checkpoint.interval=0"))
    assert "resumed from" in out and "step_00000010 at step 10" in out
    # memory rows are written where each process starts (step 0, and 10 for the resumed one)
    a, b = (metrics(run) for run in (straight, split))
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]  # bitwise (exact float equality)
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert [r.get("grad_norm") for r in a] == [r.get("grad_norm") for r in b]


def test_incomplete_and_corrupted_checkpoints_are_skipped_and_training_repeats_exactly(tmp_path, local_straight):
    run = tmp_path / "run"
    shutil.copytree(local_straight, run)
    first = metrics(run)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step_00000020", ckpts / "step_00000030")
    (ckpts / "step_00000030" / "manifest.json").unlink()  # as if the save was cut off before the manifest
    weights = ckpts / "step_00000020" / "model.safetensors"  # a flipped bit: same size, wrong sha256
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    shutil.copytree(ckpts / "step_00000010", ckpts / ".tmp-step_00000040")  # an interrupted save
    out = check(launch(run, *COMMON, "train.max_steps=20", "checkpoint.interval=10"))
    assert "skipping incomplete checkpoint" in out and "step_00000030: no manifest.json" in out
    assert "skipping corrupted checkpoint" in out and "model.safetensors: sha256 does not match" in out
    assert "resumed from" in out and "step_00000010 at step 10" in out
    again = metrics(run)
    assert len(again) == len(first)  # zip below would hide a shorter run
    assert again == [dict(r, tokens_per_s=s["tokens_per_s"]) if "loss" in r else r for r, s in zip(first, again)]
    assert (ckpts / "step_00000020" / "manifest.json").is_file()  # re-saved complete
    assert (ckpts / ".tmp-step_00000040").is_dir() and (ckpts / "step_00000030").is_dir()  # never deleted


def test_resume_from_an_explicit_checkpoint_directory(tmp_path, local_straight):
    straight, branch = local_straight, tmp_path / "branch"
    ckpt = straight / "checkpoints" / "step_00000010"
    out = check(launch(branch, *COMMON, "train.max_steps=20", f"checkpoint.resume={ckpt}"))
    assert f"resumed from {ckpt} at step 10" in out
    a = [r.get("loss") for r in metrics(straight) if r["step"] > 10]
    assert sorted({r["step"] for r in metrics(branch)}) == list(range(11, 21))  # every step, none missing
    assert a == [r.get("loss") for r in metrics(branch)]  # the branch continues the same trajectory


def test_resume_never_refuses_to_overwrite(tmp_path):
    run = tmp_path / "run"
    check(launch(run, "train.max_steps=2"))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = launch(run, "train.max_steps=4", "checkpoint.resume=never")
    assert proc.returncode == 2
    assert "checkpoint.resume=never but" in proc.stdout and "nothing was changed" in proc.stdout
    # refused by the launcher before it wrote anything: config.yaml and overrides.json keep the run's own
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()


def test_a_checkpoint_from_another_device_type_resumes_with_fresh_random_states(tmp_path):
    """Checkpoints record the device type; generator states are device-specific (a CPU state restored on
    CUDA fails at megatron's first fork), so a checkpoint written on another device resumes its weights,
    optimizer and data position, and says that its random-number states were not restored."""
    run = tmp_path / "run"
    check(launch(run, "train.max_steps=2"))
    manifest = run / "checkpoints" / "step_00000002" / "manifest.json"
    written = json.loads(manifest.read_text())
    assert written["layout"]["device"] == "cpu"
    written["layout"]["device"] = "cuda"  # as a GPU run writes it
    manifest.write_text(json.dumps(written))
    out = check(launch(run, "train.max_steps=4"))
    assert "step_00000002 was written on cuda; its random-number states are not restored on cpu" in out
    assert "resumed from" in out and [r["step"] for r in metrics(run) if "loss" in r][-2:] == [3, 4]
