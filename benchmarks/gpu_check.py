"""The first hour on a GPU, in one script: what a developer with a lent GPU runs (under 10 minutes of device
time on one H100) to see that gorilla_dist works there and how fast, with the results as JSON.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--skip tests,attention,launch,parity,mfu]

Each part runs on its own and records its error instead of stopping the script:
  environment  torch / CUDA / GPU / compute capability / shared memory per block / flash-attn / Triton;
  tests        the GPU-marked tests (`pytest -m gpu`: Triton kernels against the reference in bf16/fp16/fp32, the
               sparse model on CUDA against the CPU path, flash-attn against SDPA, a training run on CUDA);
  attention    block-sparse Triton vs flash-attn (or SDPA's flash backend) vs SDPA, bf16, per kept block
               (benchmarks/attention.py's GPU table) at 2,048 and 8,192 tokens;
  launch       shapes at the edge of the shared memory (bf16 64x128, 128x128, 128x256; fp32 64x64, 64x256,
               128x128) launched forward + backward as the plan says (kernels/shared_memory.py):
               Triton at its pipelining depth, or the block-gather path; any "out of resource" is a failure;
  parity       the same short run (model=tiny, 40 steps) in fp32 on the CPU and in fp32 / bf16 / fp16 on the GPU:
               final losses and their differences from GPU fp32 (tolerances: fp32 1e-3 relative, bf16 and
               fp16 3e-2: flash and TF32 kernels are not bitwise the CPU's, and atomics make bf16 runs
               non-deterministic);
  mfu          model=1b on one GPU, bf16, 20 steps: tokens/s, MFU, first-step peak memory and the host syncs
               of quiet steps (logging.count_syncs: none expected), from the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "tests", "attention", "launch", "parity", "mfu")
QUIET = ["logging.wandb.mode=disabled", "logging.progress=false", "logging.plot=false", "train.sample_tokens=0"]


def environment() -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   shared_memory_per_block_optin=getattr(p, "shared_memory_per_block_optin", None))
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import flash_attn

        out["flash_attn"] = flash_attn.__version__
    except ImportError as err:
        out["flash_attn"] = f"not importable: {err}"
    return out


def tests(timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider",
                           "tests/"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    tail = proc.stdout.strip().splitlines()[-15:]
    return {"exit": proc.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def attention() -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import contextlib
    import io

    from attention import gpu

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        gpu([2048, 8192], density=0.1, reps=3)
    return {"table": text.getvalue().strip().splitlines()}


def launch() -> dict:
    import torch

    from gorilla_dist.kernels import block_sparse, layouts
    from gorilla_dist.kernels.block_sparse import block_sparse_attention, block_sparse_reference

    results = []
    # the edge of the shared memory (kernels/triton_shared_memory.json): bf16 128 x 128 is the tightest fit on an
    # A100 (dK/dV 162 of 163 KB); bf16 128 x 256, fp32 64 x 256 and 128 x 128 fall back on both GPUs; bf16
    # 64 x 128 and fp32 64 x 64 fit both (fp32 kernels at block 128 take minutes to compile: left out)
    for dtype, block, head_dim in ((torch.bfloat16, 64, 128), (torch.bfloat16, 128, 128), (torch.bfloat16, 128, 256),
                                   (torch.float32, 64, 64), (torch.float32, 64, 256), (torch.float32, 128, 128)):
        seq, heads = 4 * block, 2
        lay = layouts.sliding(seq, block, window=2).to("cuda")
        q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        plan = block_sparse.launch_plan(q.device, block, head_dim, dtype)
        row = {"dtype": str(dtype).replace("torch.", ""), "block": block, "head_dim": head_dim,
               "path": ("triton " + "/".join(str(o["num_stages"]) for o in plan.options.values())
                        if plan.options else "block-gather"), "reason": plan.reason}
        try:
            out = block_sparse_attention(q, k, v, lay)
            out.float().sum().backward()
            want = block_sparse_reference(q.detach().float(), k.detach().float(), v.detach().float(), lay)
            row["max_error"] = float((out.detach().float() - want).abs().max())
            row["ok"] = row["max_error"] < (2e-2 if dtype == torch.bfloat16 else 1e-2)
        except Exception as err:  # noqa: BLE001 - recorded: "out of resource" is what this looks for
            row.update(ok=False, error=f"{type(err).__name__}: {str(err)[:300]}")
        results.append(row)
    return {"shapes": results, "all_ok": all(r["ok"] for r in results)}


def run(run_dir: Path, *overrides: str, timeout: float = 300) -> dict:
    """One training run through the launcher; its summary.json (and the command's tail when it failed)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", f"run.dir={run_dir}", *QUIET, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = {"exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    summary = run_dir / "summary.json"
    if proc.returncode or not summary.is_file():
        out["tail"] = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return out
    out["summary"] = json.loads(summary.read_text())
    return out


def parity(scratch: Path) -> dict:
    common = ["model=tiny", "train.max_steps=40", "train.log_interval=10", "train.eval_interval=40",
              "train.eval_samples=64", "train.global_batch_size=16", "train.micro_batch_size=8"]
    runs = {"cpu fp32": run(scratch / "cpu", "parallel.device=cpu", "precision=fp32", *common),
            **{f"gpu {p}": run(scratch / p, "parallel.device=cuda", f"precision={p}", *common)
               for p in ("fp32", "bf16", "fp16")}}
    out = {name: {"exit": r["exit"], "final_loss": r.get("summary", {}).get("final_loss"),
                  "final_val_loss": r.get("summary", {}).get("final_val_loss"),
                  "overflow_steps": r.get("summary", {}).get("overflow_steps"), "tail": r.get("tail")}
           for name, r in runs.items()}
    ref = out["gpu fp32"]["final_val_loss"]
    tolerance = {"cpu fp32": 1e-3, "gpu bf16": 3e-2, "gpu fp16": 3e-2}
    for name, tol in tolerance.items():
        got = out[name]["final_val_loss"]
        if ref is not None and got is not None:
            out[name]["relative_to_gpu_fp32"] = abs(got - ref) / abs(ref)
            out[name]["within_tolerance"] = out[name]["relative_to_gpu_fp32"] <= tol
    return out


def mfu(scratch: Path) -> dict:
    r = run(scratch / "1b", "model=1b", "precision=bf16", "parallel.device=cuda", "train.max_steps=20",
            "train.log_interval=5", "train.eval_interval=0", "train.global_batch_size=16",
            "train.micro_batch_size=4", "parallel.activation_checkpointing=selective", "logging.count_syncs=true",
            timeout=420)
    s = r.get("summary", {})
    return {"exit": r["exit"], "wall_s": r["wall_s"], "mean_tokens_per_s": s.get("mean_tokens_per_s"),
            "mean_mfu": s.get("mean_mfu"), "peak_memory": s.get("peak_memory"), "host_syncs": s.get("host_syncs"),
            "tail": r.get("tail")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: " + ",".join(PARTS))
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(PARTS)
    if unknown:
        print(f"error: --skip {','.join(sorted(unknown))}: expected parts among {','.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible here (torch.cuda.is_available() is False): this script is for a GPU "
              "machine; the CPU benchmarks are the other files in benchmarks/", file=sys.stderr)
        return 2
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        parts = {"environment": environment, "tests": tests, "attention": attention, "launch": launch,
                 "parity": lambda: parity(Path(tmp)), "mfu": lambda: mfu(Path(tmp))}
        for name in PARTS:
            if name in skip:
                continue
            start = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                results[name] = parts[name]()
            except Exception:  # noqa: BLE001 - one part failing must not hide the others' numbers
                results[name] = {"error": traceback.format_exc(limit=5)}
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")  # kept if later parts hang
    print(f"[gpu_check] results: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
