"""The README is executable: every command of its ```bash blocks runs here as printed, in order, in one
scratch directory (so a later command finds what an earlier one made), with only size overrides appended to
each launcher command for the keys it does not set itself (README, "Every README command runs in the
suite"), and must exit 0; a command the README marks `# -> config error: ...` must print that error and
exit 2. The inputs the README names (corpus/web/, code/*.jsonl.gz, rows.jsonl, docs.jsonl) are made here
from the bundled corpus. Commands that cannot run on this machine are listed in NOT_HERE with the reason;
a README command that is neither runnable nor listed fails the test."""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO

from gorilla_dist.data.loader import bundled_corpus

SIZE = ["model.hidden_size=64", "model.num_heads=4", "train.max_steps=2",
        "train.global_batch_size=4", "train.eval_interval=2", "train.eval_samples=4", "train.sample_tokens=8",
        "logging.wandb.mode=disabled", "logging.progress=false", "logging.plot=false", "data.verify=size"]
"""Appended to every `python -m launcher` command, each only where the command does not set its key, but
train.max_steps always (the README's `train.max_steps=200` runs 2)."""

NOT_HERE = {
    "pytest -m gpu": "the GPU-marked tests need a CUDA GPU (here they are collected and skipped by the suite)",
    "benchmarks/gpu_check.py": "needs a CUDA GPU (it refuses to run without one: tests/unit/test_gpu_check.py)",
    "python -m pytest": "the test command itself (CI runs it: .ci/run, tests/unit/test_readme.py)",
    "tokenizer=llama/": "needs a Hugging Face Llama model directory (llama/), downloaded",
    "checkpoint.init_from=hf:llama/": "needs a Hugging Face Llama model directory (llama/), downloaded",
    "slurm.gpus_per_node=8": "a Slurm job of 2-4 nodes x 8 GPUs (the one-node dev cluster runs tests/integration/"
                             "test_slurm.py)",
    "launch.nnodes=2": "two nodes (tests/integration/test_multinode.py runs this in network namespaces)",
}

SETUP = re.compile(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install [^&]+&& ")
"""The first command's set-up part: the suite runs inside that installation."""

WRAPPER = textwrap.dedent("""\
    python() {
      if [ "$1" = "-m" ] && [ "$2" = "launcher" ]; then
        local extra=() kv key a found
        for kv in $GD_SIZE; do
          key="${kv%%=*}"; found=0
          [ "$key" != train.max_steps ] && for a in "$@"; do case "$a" in "$key="*) found=1;; esac; done
          [ $found = 0 ] && extra+=("$kv")
        done
        "$GD_PYTHON" "$@" "${extra[@]}"
      else
        "$GD_PYTHON" "$@"
      fi
    }
    """)


def readme_blocks() -> list[str]:
    """The ```bash blocks of README.md (indented ones too), dedented."""
    text = (REPO / "README.md").read_text()
    return [textwrap.dedent(m[1] + "\n") for m in re.finditer(r"^ *```bash\n(.*?)\n *```", text, re.M | re.S)]


def commands(block: str) -> list[str]:
    """A block's commands: continuation lines joined, comment lines dropped; `[optional ...]` arguments (the
    README's notation for what may be left out) removed."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r" \[[^\]]*=<?[^\]]*\]", "", line) if "=<" in line or "|" in line else line)
    return out


def inputs(root) -> None:
    """The files the README's examples name, made from the bundled corpus."""
    speeches = bundled_corpus().read_text().split("\n\n")
    (root / "corpus" / "web").mkdir(parents=True)
    for i in range(4):
        (root / "corpus" / "web" / f"part{i}.txt").write_text("\n\n".join(speeches[i * 200:(i + 1) * 200]))
    (root / "code").mkdir()
    for i in range(2):
        with gzip.open(root / "code" / f"part{i}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps({"content": s}) + "\n" for s in speeches[1000 + i * 100:1100 + i * 100])
    rows = []
    for s in speeches[:400]:
        speaker, _, speech = s.partition(":\n")
        if speech:
            rows.append({"instruction": "Who speaks?", "input": speech[:40], "output": speaker, "label": speaker})
    top = sorted({r["label"] for r in rows}, key=[r["label"] for r in rows].count)[-3:]
    rows = [r for r in rows if r["label"] in top][:60]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "docs.jsonl").write_text("".join(json.dumps({"instruction": r["input"], "label": r["label"]}) + "\n"
                                             for r in rows))


def test_every_readme_command_runs_as_printed(tmp_path):
    inputs(tmp_path)
    env = {**os.environ, "GD_SIZE": " ".join(SIZE), "GD_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    assignments, ran, skipped = [], [], []
    for block in readme_blocks():
        for command in commands(block):
            reason = next((why for key, why in NOT_HERE.items() if key in command), None)
            if reason:
                skipped.append((command, reason))
                continue
            command = SETUP.sub("", command)
            if re.match(r"^[A-Z_]+=", command):  # a shell variable the next commands use
                assignments.append(command)
                continue
            assert command.startswith("python -m "), f"a README command the test does not know how to run: {command}"
            expected = re.search(r"# -> config error: (.*)$", command)
            script = "\n".join([WRAPPER, *assignments, command.split(" # -> ")[0]])
            start = time.perf_counter()
            proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=600)
            took = time.perf_counter() - start
            if expected:
                assert proc.returncode == 2 and f"config error: {expected[1]}" in proc.stdout, (command, proc.stdout)
            else:
                assert proc.returncode == 0, f"README command failed (exit {proc.returncode}): {command}\n" \
                                             f"{proc.stdout[-4000:]}"
            ran.append((command, took))
    print(f"\n[readme] ran {len(ran)} commands in {sum(t for _, t in ran):.0f} s:")
    for command, took in ran:
        print(f"  {took:5.1f} s  {command[:110]}")
    print(f"[readme] {len(skipped)} not runnable here:")
    for command, reason in skipped:
        print(f"  {command[:100]}  -- {reason}")
    assert len(ran) >= 35 and len(skipped) == 8, (len(ran), skipped)  # (the commands NOT_HERE names)
    # what the commands were for: the default run sampled, the sweep ran 4 jobs, exports load
    assert (tmp_path / "runs" / "default" / "summary.json").is_file()
    assert sorted(json.loads((tmp_path / "sweeps" / "lr" / "sweep.json").read_text())["jobs"][i]["status"]
                  for i in range(4)) == [0, 0, 0, 0]
    for out in ("hf/default", "hf/from_file", "hf/lora", "hf/lora_adapter"):
        assert any((tmp_path / out).glob("*.safetensors")), out


@pytest.mark.parametrize("command,expected", [
    ("python -m launcher x=1 \\\n    y=2  # note", ["python -m launcher x=1 y=2  # note"]),
    ("python -m gorilla_dist.evaluate run.dir=r [checkpoint=<dir>] [samples=N]",
     ["python -m gorilla_dist.evaluate run.dir=r"]),
])
def test_commands_are_read_as_the_shell_would(command, expected):
    assert [re.sub(" +", " ", c) for c in commands(command)] == [re.sub(" +", " ", c) for c in expected]
