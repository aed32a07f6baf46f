"""Per-rank memory of the training state under ZeRO 0-3 on 2 and 4 ranks, and activation memory with
and without activation checkpointing, for a ~50M-parameter model in bf16 mixed precision.

    python benchmarks/memory.py [--out benchmarks/results/memory.json]

Every number is what the framework itself reports (gorilla_dist.memory, the `"memory": "first_step"`
row of metrics.jsonl) for one real training step through `python -m launcher` (torchrun, gloo):
parameters + gradients + optimizer state (AdamW moments and the fp32 master copy) per rank, counted
from the tensors each rank holds; and the measured activation peak of a micro-batch's forward and
backward. Targets (issue 6): ZeRO-3 per-rank state <= 0.55x ZeRO-0 on 2 ranks and <= 0.3x on 4;
full activation checkpointing <= 0.3x the activation memory of none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# ~50M parameters: 16 layers x 12 * 512^2 (attention + 4x MLP) + embeddings
MODEL = ["model=tiny", "model.num_layers=16", "model.hidden_size=512", "model.num_heads=8"]
COMMON = ["precision=bf16", "train.max_steps=1", "train.eval_interval=0", "train.sample_tokens=0",
          "checkpoint.interval=0", "checkpoint.keep=1", "logging.wandb.mode=disabled", "logging.progress=false"]
KINDS = ("params", "grads", "optimizer")


def first_step(run_dir: Path, overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "launcher", f"run.dir={run_dir}", *MODEL, *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(overrides)}: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["ranks"] for r in rows if r.get("memory") == "first_step")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def state_table(work: Path) -> dict:
    results = {}
    print("per-rank training state, bf16 (MiB; the largest rank):")
    print(f"{'ranks':>5} {'zero':>4} {'params':>9} {'grads':>9} {'optimizer':>10} {'total':>9} {'vs ZeRO-0':>9}")
    for ranks in (2, 4):
        base = None
        for stage in (0, 1, 2, 3):
            per_rank = first_step(work / f"z{stage}_r{ranks}",
                                  ["launch=torchrun", f"launch.nproc_per_node={ranks}", f"parallel.zero_stage={stage}",
                                   "model.seq_length=128", f"train.global_batch_size={ranks}"])
            worst = max(per_rank, key=lambda r: sum(r[k] for k in KINDS))
            total = sum(worst[k] for k in KINDS)
            base = total if stage == 0 else base
            results[f"zero{stage}_ranks{ranks}"] = {**{k: worst[k] for k in KINDS}, "total": total,
                                                    "ratio_vs_zero0": total / base, "per_rank": per_rank}
            print(f"{ranks:>5} {stage:>4} {mib(worst['params']):>9} {mib(worst['grads']):>9} "
                  f"{mib(worst['optimizer']):>10} {mib(total):>9} {total / base:>8.3f}x")
    return results


def activation_table(work: Path) -> dict:
    results = {}
    print("\nactivation peak of one micro-batch (1 rank, bf16, micro-batch 4 x 512 tokens; MiB):")
    print(f"{'checkpointing':>13} {'activations':>12} {'vs none':>8}")
    base = None
    for mode in ("none", "selective", "full"):
        per_rank = first_step(work / f"ac_{mode}", [f"parallel.activation_checkpointing={mode}",
                                                    "model.seq_length=512", "train.global_batch_size=4"])
        peak = per_rank[0]["activations_peak"]
        base = peak if mode == "none" else base
        results[mode] = {"activations_peak": peak, "ratio_vs_none": peak / base}
        print(f"{mode:>13} {mib(peak):>12} {peak / base:>7.3f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = state_table(Path(tmp))
        acts = activation_table(Path(tmp))
    checks = {
        "zero3_2ranks <= 0.55x zero0": state["zero3_ranks2"]["ratio_vs_zero0"] <= 0.55,
        "zero3_4ranks <= 0.30x zero0": state["zero3_ranks4"]["ratio_vs_zero0"] <= 0.30,
        "full checkpointing <= 0.30x none": acts["full"]["ratio_vs_none"] <= 0.30,
    }
    print()
    for name, ok in checks.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"state": state, "activations": acts, "targets": checks}, indent=1))


if __name__ == "__main__":
    main()
