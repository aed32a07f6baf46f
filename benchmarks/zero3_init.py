"""ZeRO-3's partitioned construction: the parameter bytes each rank holds right after the model is built, and its
peak resident memory, built whole (then partitioned by deepspeed.initialize) against built inside
deepspeed.zero.Init (engine.partitioned_construction), on 2 CPU ranks in one run:

    python benchmarks/zero3_init.py [--layers 12] [--hidden 1024] [--ranks 2]

Each way runs in fresh processes (torchrun), so the peaks do not mix. Target: the partitioned build holds
1/ranks of the parameters (plus the largest module while it is made), the whole build all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RANK = """
import json, os, resource, sys
import torch
os.environ["DS_ACCELERATOR"] = "cpu"
from gorilla_dist.runtime import quiet_libraries
quiet_libraries()
from omegaconf import OmegaConf
from gorilla_dist.config import Config
from gorilla_dist.parallel import init_distributed
layers, hidden, partitioned, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
cfg = OmegaConf.structured(Config)
cfg.parallel.zero_stage, cfg.parallel.device = 3, "cpu"
cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.seq_length = layers, hidden, 16, 256
layout = init_distributed(cfg.parallel, deepspeed=True)
from gorilla_dist.engine import partitioned_construction
from gorilla_dist.model import build_model
from gorilla_dist.memory import _Allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
construct = partitioned_construction(cfg.model, cfg.parallel, cfg.precision) if partitioned else None
with _Allocations() as tensors:  # live tensor bytes, as an accelerator's allocator counts them
    model = build_model(cfg.model, vocab_size=32000, dtype="fp32", device=layout.device, seed=0, construct=construct)
held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * 4 for p in model.parameters())
total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(f"{out}.{layout.rank}", "w") as f:
    json.dump({"rank": layout.rank, "params": total, "held_mib": held / 2**20,
               "tensor_peak_mib": tensors.peak / 2**20, "peak_rss_growth_mib": (peak - before) / 1024}, f)
"""


def measure(partitioned: bool, args, tmp: Path) -> list[dict]:
    script = tmp / "rank.py"
    script.write_text(RANK)
    out = tmp / ("parted" if partitioned else "whole")
    from gorilla_dist.runtime import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", f"--master_port={free_port()}",
           str(script), str(args.layers), str(args.hidden), "1" if partitioned else "0", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(args.ranks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        whole, parted = measure(False, args, Path(tmp)), measure(True, args, Path(tmp))
    params = whole[0]["params"]
    print(f"{params / 1e6:.1f}M parameters (fp32: {params * 4 / 2**20:.0f} MiB), {args.ranks} ranks, ZeRO-3, CPU")
    print(f"{'build':>12}{'rank':>6}{'held MiB':>10}{'tensor peak MiB':>17}{'peak RSS growth MiB':>21}")
    for name, rows in (("whole", whole), ("partitioned", parted)):
        for r in rows:
            print(f"{name:>12}{r['rank']:>6}{r['held_mib']:>10.0f}{r['tensor_peak_mib']:>17.0f}"
                  f"{r['peak_rss_growth_mib']:>21.0f}")
    held = max(r["held_mib"] for r in parted) / max(r["held_mib"] for r in whole)
    tensors = max(r["tensor_peak_mib"] for r in parted) / max(r["tensor_peak_mib"] for r in whole)
    peak = max(r["peak_rss_growth_mib"] for r in parted) / max(r["peak_rss_growth_mib"] for r in whole)
    print(f"partitioned / whole: parameters held {held:.3f}x, live tensor peak {tensors:.3f}x, peak RSS growth "
          f"{peak:.3f}x (target: held and tensor peak ~{1 / args.ranks:.2f}x)")


if __name__ == "__main__":
    main()
