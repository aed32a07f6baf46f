"""Checkpoint save and load at scale: peak extra memory per rank and wall time, gathered vs sharded.

    python benchmarks/checkpoint_scale.py [--model 1b] [--layers N] [--ranks 2] [--zero 3] [--before] [--out F.json]

Two gloo ranks (torchrun), fp32, ZeRO-3, the engine built directly (no data, no training: AdamW's moments
are created as at its first step). Each rank samples its own memory every 2 ms in a thread while it
works; "extra" is the peak over the value just before the operation:
  anon  RssAnon: memory the process allocated (the number that runs out);
  rss   VmRSS: anon plus the checkpoint files' pages mapped while reading them (the page cache's, which
        the kernel can drop).
Operations, each on every rank at once:
  sharded save  Checkpointer.save: each rank writes its own parts (engine.local_state), no gathering
                (checkpoint.consolidated=false, the default for a model this size)
  sharded load  Checkpointer.load of that checkpoint: every rank joins one whole tensor at a time
  gathered save (--before) what Checkpointer.save did before shards (gorilla_dist 0.x up to fd75c6d):
                engine.full_state(keep=rank 0) gathers every whole tensor to rank 0, which holds them all
                and writes model.safetensors + optimizer.safetensors with safetensors' save_file. At
                model=1b this needs ~2 x 8.7 GB on rank 0 on top of its 7 GB of state: more than this
                24 GiB machine has, so it is measured with fewer layers (--layers) and its per-parameter
                cost stated.
The target: a rank's extra memory during save and load is at most its own state (its parts of the
weights and moments) plus the largest single tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """The peak RssAnon / VmRSS above their values at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.base, self.peak, self.done = _status(), _status(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self.done:
            now = _status()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.done = True
        self.thread.join()
        now = _status()
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
        self.result = {"seconds": round(self.seconds, 2),
                       "extra_anon_gb": round((self.peak["RssAnon"] - self.base["RssAnon"]) / 1e9, 3),
                       "extra_rss_gb": round((self.peak["VmRSS"] - self.base["VmRSS"]) / 1e9, 3)}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from gorilla_dist.runtime import quiet_libraries

    quiet_libraries()
    from gorilla_dist.engine.startup import import_megatron

    import_megatron(wandb=False)
    from gorilla_dist.checkpoint import Checkpointer
    from gorilla_dist.config import Config
    from gorilla_dist.engine import build_engine
    from gorilla_dist.model.spec import build_model
    from gorilla_dist.parallel import init_distributed, teardown

    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / f"conf/model/{args.model}.yaml"))
    if args.layers:
        cfg.model.num_layers = args.layers
    cfg.model.seq_length = 64
    cfg.parallel.zero_stage, cfg.precision.dtype = args.zero, "fp32"
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, args.ranks
    cfg.run.dir = args.run_dir
    cfg.checkpoint.consolidated = "false"
    layout = init_distributed(cfg.parallel)
    rank = layout.rank
    model = build_model(cfg.model, vocab_size=256, dtype="fp32", device=layout.device, seed=1)
    engine = build_engine(model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel, precision=cfg.precision,
                          layout=layout)
    del model
    weights, moments, _ = engine.local_state()  # creates AdamW's state (as its first step would), before measuring
    own = sum(p.data.numel() * 4 for part in (weights, moments) for p in part.values())
    largest = max(4 * torch.Size(p.shape).numel() for p in weights.values())
    params = sum(torch.Size(p.shape).numel() for p in weights.values())
    del weights, moments
    result = {"rank": rank, "own_state_gb": round(own / 1e9, 3), "largest_tensor_gb": round(largest / 1e9, 3),
              "params_seen": params, "rss_before_gb": round(_status()["VmRSS"] / 1e9, 3)}
    ckpt = Checkpointer(cfg, layout)
    dist.barrier()
    with Peak() as save:
        path = ckpt.save(1, engine, {})
    result["sharded_save"] = save.result
    dist.barrier()
    with Peak() as load:
        ckpt.load(path, engine)
    result["sharded_load"] = load.result
    result["checkpoint_gb"] = round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 3)
    if args.before:
        from safetensors.torch import save_file

        old = Path(args.run_dir) / "gathered"
        old.mkdir(exist_ok=True)
        dist.barrier()
        with Peak() as gathered:  # fd75c6d's Checkpointer.save, its tensor part
            w, m, _ = engine.full_state(keep=layout.is_main)
            if layout.is_main:
                save_file(m, str(old / "optimizer.safetensors"))
                save_file(w, str(old / "model.safetensors"))
            del w, m
            dist.barrier()
        result["gathered_save"] = gathered.result
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    teardown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the model config has (0: as is)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--before", action="store_true", help="also the gathered save (the code before shards)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="ckpt-scale-") as run:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", "--master_port=29473",
                __file__, "--worker", f"--run-dir={run}", f"--model={args.model}", f"--layers={args.layers}",
                f"--ranks={args.ranks}", f"--zero={args.zero}"] + (["--before"] if args.before else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"the benchmark's ranks failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = sorted((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
                   key=lambda r: r["rank"])
    summary = {"model": args.model, "layers": args.layers or None, "ranks": args.ranks, "zero": args.zero,
               "seconds_total": round(time.time() - t0, 1), "per_rank": ranks}
    for r in ranks:
        budget = r["own_state_gb"] + r["largest_tensor_gb"]
        line = (f"rank {r['rank']}: own state {r['own_state_gb']:.2f} GB, largest tensor {r['largest_tensor_gb']:.3f} GB"
                f" -> budget {budget:.2f} GB")
        for op in ("sharded_save", "sharded_load", "gathered_save"):
            if op in r:
                x = r[op]
                line += (f"\n  {op:14s} {x['seconds']:7.2f} s  extra anon {x['extra_anon_gb']:6.2f} GB "
                         f"({x['extra_anon_gb'] / budget:5.2f} x budget)  extra rss {x['extra_rss_gb']:6.2f} GB")
        print(line)
    print(f"checkpoint on disk: {ranks[0]['checkpoint_gb']:.2f} GB; parameters {ranks[0]['params_seen']:,}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
