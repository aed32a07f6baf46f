"""Pipeline parallelism (parallel.pp): per-stage memory, the measured bubble against the 1F1B bound, step time.

    python benchmarks/pipeline.py [--out benchmarks/results/pipeline.json] [--steps 4]

1. Through `python -m launcher` (torchrun, 2 gloo ranks, model=small, fp32, 8 micro-batches of 2 per step): the
   first-step memory the framework reports per rank (metrics.jsonl) and tokens/s, for pp=2 against pp=1 (the
   2 ranks data-parallel, ZeRO-0: each holds the whole model), and for pp=2 interleaved over 2 chunks per rank. Target (issue 39): a stage's parameter +
   optimizer bytes <= 0.55x those of one rank holding the whole model.
2. The bubble: this file under torchrun as 2 stages (`--worker`), the real PipelineEngine and train_step on
   model=small; each stage's time blocked in its point-to-point exchanges (StageLinks.exchange, timed here) per
   step, as a fraction of the step, for m = 4, 8, 16 micro-batches, against the 1F1B bound (p - 1) / (m + p - 1)
   of equal stages with free communication; and the same for the interleaved schedule with 2 model chunks per
   rank (parallel.pp_schedule=interleaved, pp_virtual=2) against its bound (p - 1) / (v m + p - 1). Our stages
   are not equal (the last holds the output layer and the loss, the first only the embedding lookup), so the
   measured idle time includes that imbalance, and the transfers themselves (gloo, on the same 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = ["model=small", "model.dropout=0", "train.global_batch_size=16", "train.micro_batch_size=2",
          "train.eval_interval=0", "train.sample_tokens=0", "checkpoint.interval=0", "logging.wandb.mode=disabled",
          "logging.progress=false", "logging.plot=false", "train.log_interval=1", "parallel.device=cpu",
          "launch=torchrun", "launch.nproc_per_node=2"]
KINDS = ("params", "grads", "optimizer")


def run(work: Path, name: str, overrides: list[str], steps: int) -> dict:
    run_dir = work / name
    cmd = [sys.executable, "-m", "launcher", f"run.dir={run_dir}", *COMMON, f"train.max_steps={steps}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ranks = next(r["ranks"] for r in rows if r.get("memory") == "first_step")
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # (the first step builds caches)
    return {"ranks": ranks, "tokens_per_s": sum(speeds) / len(speeds)}


def memory_and_speed(work: Path, steps: int) -> dict:
    one = run(work, "pp1", [], steps)
    two = run(work, "pp2", ["parallel.pp=2"], steps)
    interleaved = run(work, "pp2_interleaved_v2", ["parallel.pp=2", "parallel.pp_schedule=interleaved",
                                                   "parallel.pp_virtual=2"], steps)
    whole = max(r["params"] + r["optimizer"] for r in one["ranks"])
    print("first step, per rank (MiB): params grads optimizer activations_peak | params+optimizer vs whole model")
    result = {"pp1_dp2": one, "pp2": two, "pp2_interleaved_v2": interleaved}
    for name, r in result.items():
        for rank, numbers in enumerate(r["ranks"]):
            share = (numbers["params"] + numbers["optimizer"]) / whole
            numbers["params_optimizer_vs_whole"] = share
            print(f"  {name} rank {rank}: " + " ".join(f"{numbers[k] / 2**20:8.2f}" for k in (*KINDS, "activations_peak"))
                  + f" | {share:.3f}x")
    worst = max(n["params_optimizer_vs_whole"] for n in two["ranks"])
    result["pp2_worst_stage_vs_whole"] = worst
    result["step_time_ratio_pp2_vs_pp1"] = one["tokens_per_s"] / two["tokens_per_s"]
    result["step_time_ratio_interleaved_vs_pp1"] = one["tokens_per_s"] / interleaved["tokens_per_s"]
    print(f"pp=2 stage state: {worst:.3f}x of the whole model's (target <= 0.55): {'met' if worst <= 0.55 else 'MISSED'}")
    print(f"tokens/s: pp=1 (dp 2) {one['tokens_per_s']:,.0f}, pp=2 {two['tokens_per_s']:,.0f}; step time pp2/pp1 "
          f"{result['step_time_ratio_pp2_vs_pp1']:.2f}x; interleaved (2 chunks) {interleaved['tokens_per_s']:,.0f}, "
          f"{result['step_time_ratio_interleaved_vs_pp1']:.2f}x")
    return result


def bubbles(steps: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "bubble.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611", __file__,
           "--worker", str(out), "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"bubble workers: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    result = json.loads(out.read_text())
    print("\nbubble: time blocked in exchanges / step time, per stage (2 stages, model=small, micro-batch 2)")
    print(f"{'schedule':>14} {'m':>3} {'bound':>7} {'stage 0':>8} {'stage 1':>8} {'step s':>7}")
    for schedule, by_m in result.items():
        for m, r in by_m.items():
            print(f"{schedule:>14} {m:>3} {r['bound']:>7.3f} {r['idle_fraction'][0]:>8.3f} "
                  f"{r['idle_fraction'][1]:>8.3f} {r['step_s']:>7.2f}")
    return result


def worker(out: str, steps: int) -> None:
    """One stage of 2 (under torchrun): the bubble for m = 4, 8, 16, in 1F1B and interleaved over 2 chunks."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from gorilla_dist.config import OptimConfig, ParallelConfig, PrecisionConfig, TrainConfig
    from gorilla_dist.config.model import ModelConfig
    from gorilla_dist.data.loader import Batch
    from gorilla_dist.engine import build_engine
    from gorilla_dist.engine.pipeline import StageLinks
    from gorilla_dist.model import build_model
    from gorilla_dist.parallel import init_distributed, teardown
    from gorilla_dist.train import train_step

    blocked = [0.0]
    exchange = StageLinks.exchange

    def timed(self, **kwargs):
        start = time.perf_counter()
        try:
            return exchange(self, **kwargs)
        finally:
            blocked[0] += time.perf_counter() - start

    StageLinks.exchange = timed
    layout = init_distributed(OmegaConf.structured(ParallelConfig(device="cpu", pp=2)))
    m_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig()), OmegaConf.load(REPO / "conf/model/small.yaml"),
                            {"dropout": 0.0})
    vocab, micro, seq, p = 65, 2, m_cfg.seq_length, 2
    results = {}
    for schedule, v in (("1f1b", 1), ("interleaved_v2", 2), ("interleaved_v3", 3)):
        parallel = OmegaConf.structured(ParallelConfig(device="cpu", pp=p, pp_schedule=schedule.split("_")[0],
                                                       pp_virtual=v))
        results[schedule] = {}
        for m in (4, 8, 16):
            model = build_model(m_cfg, vocab_size=vocab, dtype="fp32", device=layout.device, seed=0, parallel=parallel)
            train = OmegaConf.structured(TrainConfig(global_batch_size=m * micro, micro_batch_size=micro,
                                                     max_steps=steps))
            engine = build_engine(model, optim=OmegaConf.structured(OptimConfig()), train=train, parallel=parallel,
                                  precision=OmegaConf.structured(PrecisionConfig()), layout=layout)
            g = torch.Generator().manual_seed(m)
            times, idle = [], []
            for step in range(steps):
                ids = torch.randint(0, vocab, (m * micro, seq + 1), generator=g)
                batches = [Batch(tokens=ids[i:i + micro, :-1], labels=ids[i:i + micro, 1:],
                                 loss_mask=torch.ones(micro, seq), position_ids=torch.arange(seq).expand(micro, seq),
                                 segments=None, source=torch.zeros(micro, dtype=torch.long))
                           for i in range(0, m * micro, micro)]
                dist.barrier()
                blocked[0], start = 0.0, time.perf_counter()
                train_step(engine, batches, layout)
                if step:  # (the first step builds caches)
                    times.append(time.perf_counter() - start)
                    idle.append(blocked[0])
            mine = (sum(idle) / sum(times), sum(times) / len(times))
            both = [None, None]
            dist.all_gather_object(both, mine)
            results[schedule][m] = {"bound": (p - 1) / (v * m + p - 1), "idle_fraction": [b[0] for b in both],
                                    "step_s": max(b[1] for b in both)}
            del engine, model
    if layout.is_main:
        Path(out).write_text(json.dumps(results, indent=1))
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"memory_and_speed": memory_and_speed(Path(tmp), args.steps), "bubble": bubbles(args.steps)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
