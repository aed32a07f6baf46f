"""Two nodes vs one host: all-reduce latency and bandwidth, and training step time, in one run.

    python benchmarks/multinode.py [--sizes-kb 1 16 256 4096 65536] [--reps 20] [--steps 60] [--out F.json]

Needs root and the two-node cluster (`bash slurm/dev_cluster.sh start nodes=2`; started and stopped here
if it is not up). Two gloo ranks, each measured both ways in this run:
  allreduce  torch.distributed.all_reduce of fp32 tensors from 1 KB to 64 MB (sum, 2 ranks): median time,
             and bus bandwidth 2(n-1)/n * bytes / time (n = 2: bytes / time), on loopback (both ranks on
             this host) and across the bridge (one rank in each node's namespace, over its eth0).
  step       model=debug (and model=tiny), 2 ranks data parallel: tokens/s after warm-up, torchrun on this
             host vs `launch=torchrun launch.nnodes=2` with one rank per node.
What the numbers imply for gradient buckets: the size at which a bucket's all-reduce stops being
latency-bound (time ~ flat) and starts being bandwidth-bound is the smallest bucket worth sending.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF2 = Path("/var/lib/gorilla-slurm-2node/slurm.conf")
PORT = 29471

ALLREDUCE = """
import datetime, json, os, sys, time, statistics
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
sizes, reps = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for kb in sizes:
    t = torch.ones(kb * 1024 // 4)
    for _ in range(3):
        dist.all_reduce(t)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - start)
    out[kb] = statistics.median(times)
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def dev_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm/dev_cluster.sh"), *args], capture_output=True, text=True)


def on_node(node: str, *argv: str) -> list[str]:
    return ["bash", str(REPO / "slurm/dev_cluster.sh"), "on", node, *argv]


def allreduce(sizes: list[int], reps: int, across: bool) -> dict[int, float]:
    argv = [sys.executable, "-c", ALLREDUCE, json.dumps(sizes), str(reps)]
    procs = []
    for rank in (1, 0):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(PORT),
               "MASTER_ADDR": "gd-node1" if across else "127.0.0.1", "OMP_NUM_THREADS": "1"}
        cmd = on_node(f"gd-node{rank + 1}", *argv) if across else argv
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            sys.exit(f"all-reduce run failed:\n{err[-3000:]}")
    line = next(l for l in outs[1][0].splitlines() if l.startswith("RESULT "))
    return {int(k): v for k, v in json.loads(line[7:]).items()}


def step_rate(model: str, steps: int, across: bool, work: Path) -> float:
    run = work / f"{model}-{'across' if across else 'local'}"
    common = [f"run.dir={run}", f"model={model}", f"train.max_steps={steps}", "train.log_interval=10",
              "train.eval_interval=0", "train.sample_tokens=0", "checkpoint.interval=0",
              "logging.wandb.mode=disabled", "logging.progress=false", "logging.plot=false", "launch=torchrun"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if across:
        args = [sys.executable, "-m", "launcher", *common, "launch.nnodes=2", "launch.nproc_per_node=1",
                f"launch.rdzv_endpoint=gd-node1:{PORT + 1}"]
        second = subprocess.Popen(on_node("gd-node2", *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        first = subprocess.run(on_node("gd-node1", *args), cwd=REPO, env=env, capture_output=True, text=True)
        second.wait(timeout=300)
    else:
        first = subprocess.run([sys.executable, "-m", "launcher", *common, "launch.nproc_per_node=2"], cwd=REPO,
                               env=env, capture_output=True, text=True)
    if first.returncode:
        sys.exit(f"training run failed:\n{first.stdout[-3000:]}\n{first.stderr[-3000:]}")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first interval has warm-up
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-kb", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--models", nargs="+", default=["debug", "tiny"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: the two-node cluster is made of network namespaces")
    started = not (CONF2.parent / "slurmctld.pid").is_file()
    proc = dev_cluster("start", "nodes=2")
    if proc.returncode:
        sys.exit(proc.stdout + proc.stderr)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv),
                     "cpus": os.cpu_count()}
    try:
        local, across = allreduce(args.sizes_kb, args.reps, False), allreduce(args.sizes_kb, args.reps, True)
        print(f"{'size':>9} {'loopback ms':>12} {'GB/s':>7} {'bridge ms':>10} {'GB/s':>7} {'bridge/loop':>12}")
        rows = []
        for kb in args.sizes_kb:
            gb = kb * 1024 / 1e9
            row = {"kb": kb, "loopback_ms": local[kb] * 1e3, "loopback_gbps": gb / local[kb],
                   "bridge_ms": across[kb] * 1e3, "bridge_gbps": gb / across[kb], "ratio": across[kb] / local[kb]}
            rows.append(row)
            print(f"{kb:>7}KB {row['loopback_ms']:>12.3f} {row['loopback_gbps']:>7.2f} {row['bridge_ms']:>10.3f} "
                  f"{row['bridge_gbps']:>7.2f} {row['ratio']:>11.2f}x")
        results["allreduce"] = rows
        with tempfile.TemporaryDirectory() as tmp:
            results["step"] = {}
            for model in args.models:
                one = step_rate(model, args.steps, False, Path(tmp))
                two = step_rate(model, args.steps, True, Path(tmp))
                results["step"][model] = {"one_host_tokens_per_s": one, "two_nodes_tokens_per_s": two,
                                          "ratio": two / one}
                print(f"model={model}, 2 ranks: one host {one:,.0f} tokens/s, two nodes {two:,.0f} "
                      f"({two / one:.2f}x)")
    finally:
        if started:
            dev_cluster("stop", "nodes=2")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
