"""The real CLI end to end: progress, metrics.jsonl, W&B offline files, the end-of-training sample,
and `python -m gorilla_dist.generate` reproducing that sample from the saved checkpoint — for a
single process and for a tensor-parallel run (whose checkpoint must consolidate correctly)."""

import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, check, generate, launch, metrics

RUN = ["model=debug", "train.max_steps=20", "train.eval_interval=10", "train.eval_samples=24", "train.log_interval=5",
       "optim.warmup_steps=2", "train.sample_tokens=60", "checkpoint.interval=5", "checkpoint.keep=2",
       "logging.peak_tflops=0.174"]
LAYOUTS = {"local": [], "torchrun-tp2": ["launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2",
                                         "logging.wandb.mode=disabled"],
           # sequence parallelism splits the sampled sequence over the ranks: it is padded to a multiple of tp
           "torchrun-tp2-sp": ["launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2",
                               "parallel.sequence_parallel=true", "logging.wandb.mode=disabled"]}


def sample_from(out: str) -> str:
    match = re.search(r"--- sample \(60 tokens\) ---\n(.*)\n---", out, re.S)
    assert match, out[-3000:]
    return match.group(1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_then_generate(tmp_path, layout):
    run = tmp_path / "run"
    out = check(launch(run, *RUN, *LAYOUTS[layout], quick=False))
    rows = metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in steps)
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    # MFU = tokens/s * model FLOPs per token / (peak * ranks)
    world = 2 if layout != "local" else 1
    from omegaconf import OmegaConf

    from gorilla_dist.model import flops_per_token
    from gorilla_dist.data.tokenizer import load_tokenizer

    m = OmegaConf.load(run / "checkpoints" / "step_00000020" / "config.yaml").model
    vocab = load_tokenizer(run / "tokenizer.json").vocab_size
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token(m, vocab) / (0.174e12 * world))
               for r in steps)
    # the vocabulary comes from the tokenizer, not from a config written at run time: the two configs agree
    assert (run / "config.yaml").read_text() == (run / "checkpoints" / "step_00000020" / "config.yaml").read_text()
    # checkpoints every 5 steps, the newest 2 kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000015", "step_00000020"]
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    assert "step 20: val_loss" in out
    # the run's own picture and summary (default logging.plot=true), MFU averaged over the logged steps
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "plot.png").stat().st_size > 10_000 and summary["finished"] and summary["steps"] == 20
    assert summary["mean_mfu"] == pytest.approx(sum(r["mfu"] for r in steps) / len(steps), rel=1e-12)
    if layout == "local":
        assert "20/20" in out and "tok/s" in out  # the progress bar
        offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert offline, "no offline W&B run written"
        # W&B's own end-of-run listing (~30 lines) is silenced; one line says where the run is and how to sync it
        assert "wandb:" not in out and "Run summary" not in out
        assert f"[wandb] offline run {offline[0].parent}; upload it with: wandb sync {offline[0].parent}\n" in out

    text = sample_from(out)
    assert len(text) == 61  # the "\n" prompt + 60 characters
    gen = generate(run, "max_new_tokens=60")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.rstrip("\n") == text.rstrip("\n")


def test_generate_reports_missing_checkpoint(tmp_path):
    gen = generate(tmp_path, "prompt=ROMEO:")  # not a run at all
    assert gen.returncode == 2
    assert gen.stderr.strip().endswith(f"error: run.dir={tmp_path} is not a run directory (no config.yaml; runs are "
                                       f"started with python -m launcher run.dir={tmp_path})")
    (tmp_path / "config.yaml").write_text("run:\n  dir: x\n")  # a run that has not saved yet
    gen = generate(tmp_path, "prompt=ROMEO:")
    assert gen.returncode == 1
    assert gen.stderr.strip().endswith(f"error: no complete checkpoint under {tmp_path / 'checkpoints'} (the run "
                                       "has not finished a save yet)")


def test_compiled_model_trains_like_eager(tmp_path):
    """train.compile=true (torch.compile in place) follows the eager trajectory and still checkpoints
    under the eager parameter names, so generate works from it."""
    common = ["train.max_steps=6", "optim.warmup_steps=2", "train.log_interval=1"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    check(launch(eager, *common))
    check(launch(compiled, *common, "train.compile=true"))
    a = [r["loss"] for r in metrics(eager)]
    b = [r["loss"] for r in metrics(compiled)]
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # the compiled run's checkpoint: eager names, the eager run's weights (to the same float tolerance)
    from safetensors.torch import load_file

    w_eager, w_compiled = (load_file(str(r / "checkpoints" / "step_00000006" / "model.safetensors"))
                           for r in (eager, compiled))
    assert w_compiled.keys() == w_eager.keys()
    assert all((w_compiled[k] - w_eager[k]).abs().max() < 1e-4 for k in w_eager)
    gen = generate(compiled, "max_new_tokens=5")
    assert gen.returncode == 0 and len(gen.stdout.rstrip("\n")) >= 5, gen.stderr[-2000:]


@pytest.mark.parametrize("backend", ["local", "torchrun", "deepspeed"])
def test_sigterm_to_the_launcher_stops_the_workers_which_save_and_exit_75(tmp_path, backend):
    """A scheduler's SIGTERM to the launcher reaches every worker (not just torchrun / the deepspeed
    launcher, which would kill them or end with a traceback): they agree on a step, save, and the
    launcher exits 75; nothing is left running."""
    import time

    run = tmp_path / "run"
    ranks = [] if backend == "local" else [f"launch={backend}", "launch.nproc_per_node=2"]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", f"run.dir={run}", "model=debug",
                             "logging.wandb.mode=disabled", "logging.progress=false", "train.max_steps=100000",
                             "checkpoint.interval=0", "train.eval_interval=0", "train.sample_tokens=0", *ranks],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.5)
    proc.terminate()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "manifest.json").is_file(), out[-3000:]
    step = int(saved[0].name.split("_")[1])
    assert f"[train] stopped at step {step} on SIGTERM; the checkpoint is saved" in out
    # only the workers were signalled: torchrun and the deepspeed launcher end them if they get it themselves
    assert "SignalException" not in out and "Main process received SIGTERM" not in out, out[-3000:]

    def worker_alive():  # -ww: full command lines (ps cuts them at 80 columns without a terminal)
        return f"gorilla_dist.worker {run}" in subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True,
                                                              text=True).stdout

    deadline = time.time() + 30
    while worker_alive() and time.time() < deadline:
        time.sleep(0.5)
    orphaned = worker_alive()
    if orphaned:
        subprocess.run(["pkill", "-f", f"gorilla_dist.worker {run}"])
    assert not orphaned, "a worker outlived a SIGTERM to the launcher"
