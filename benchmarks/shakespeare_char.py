"""nanoGPT's shakespeare-char CPU configuration through the full stack, against nanoGPT in the same run.

    python benchmarks/shakespeare_char.py [--iters 2000] [--compile] [--peak-fp32 174] [--peak-bf16 720]

Configuration (nanoGPT `train_shakespeare_char.py` with its README's CPU settings): 4 layers, 4 heads,
128 wide, block 64, batch 12, lr 1e-3 -> 1e-4 cosine, warmup 100, beta2 0.99, weight decay 0.1, clip
1.0, dropout 0, eval every 250 iterations on 20 batches. That is exactly our default `model=tiny` run.

Runs, in one process tree, one after the other on the same machine:
  1. baseline: nanoGPT's model and loop in plain PyTorch (benchmarks/nanogpt_baseline.py), fp32;
  2. ours fp32: `python -m launcher` (megatron-core GPT, DeepSpeed ZeRO-0, one process);
  3. ours bf16: the same with precision=bf16.
Prints wall time, median step time, tokens/s, MFU (against the given peaks; defaults are this CPU
kind's measured 2-thread matmul peaks) and final validation loss, and ratios against the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

BLOCK, BATCH = 64, 12
TOKENS_PER_STEP = BLOCK * BATCH


def flops_per_token(vocab: int) -> float:
    from omegaconf import OmegaConf

    from gorilla_dist.config import ModelConfig
    from gorilla_dist.model.spec import flops_per_token as fpt

    m = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model/tiny.yaml"))
    return fpt(m, vocab)


def nanogpt_data() -> tuple[np.ndarray, np.ndarray, int]:
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters, the first 90% train, the rest val."""
    from gorilla_dist.data.loader import bundled_corpus

    text = bundled_corpus().read_text()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def run_baseline(iters: int) -> dict:
    from nanogpt_baseline import train_nanogpt

    train, val, vocab = nanogpt_data()
    r = train_nanogpt(train, val, vocab, iters=iters)
    step = statistics.median(r["step_times"])
    return {"wall_s": r["wall_s"], "step_ms": step * 1e3, "tokens_per_s": TOKENS_PER_STEP / step,
            "val_loss": r["val_losses"][-1][1]}


def run_ours(run_dir: Path, iters: int, precision: str, peak_tflops: float, compile_: bool) -> dict:
    args = [sys.executable, "-m", "launcher", f"run.dir={run_dir}", f"precision={precision}",
            f"train.max_steps={iters}", "train.log_interval=10", "train.sample_tokens=0", "checkpoint.interval=0",
            "logging.wandb.mode=disabled", "logging.progress=false", f"logging.peak_tflops={peak_tflops}",
            f"train.compile={str(compile_).lower()}"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{precision} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # tokens_per_s is measured per 10-step interval (eval and checkpoint time excluded); skip the first
    # interval (warm-up, and torch.compile's compilation when enabled).
    intervals = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] % 10 == 0][1:]
    tps = statistics.median(intervals)
    return {"wall_s": wall, "step_ms": TOKENS_PER_STEP / tps * 1e3, "tokens_per_s": tps,
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (train.compile=true)")
    ap.add_argument("--peak-fp32", type=float, default=174.0, help="GFLOP/s, for MFU")
    ap.add_argument("--peak-bf16", type=float, default=720.0, help="GFLOP/s, for MFU")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_shakespeare_"))
    fpt = flops_per_token(66)  # 65 characters (+ our end-of-document token; the same formula for every row)

    results = {}
    print(f"[bench] nanoGPT baseline, {args.iters} iterations ...", flush=True)
    results["nanoGPT fp32"] = dict(run_baseline(args.iters), peak=args.peak_fp32)
    for precision, peak in (("fp32", args.peak_fp32), ("bf16", args.peak_bf16)):
        print(f"[bench] gorilla_dist {precision}, {args.iters} iterations ...", flush=True)
        results[f"gorilla_dist {precision}"] = dict(
            run_ours(work / f"run_{precision}", args.iters, precision, peak / 1e3, args.compile), peak=peak)

    base = results["nanoGPT fp32"]
    print(f"\nshakespeare-char, {args.iters} iterations, batch {BATCH} x block {BLOCK}, "
          f"{fpt / 1e6:.2f} MFLOP/token (same formula for all rows)")
    print(f"{'run':<18}{'wall s':>8}{'step ms':>9}{'tokens/s':>10}{'MFU':>7}{'val loss':>10}"
          f"{'speed vs base':>15}{'wall vs base':>14}")
    for name, r in results.items():
        r["mfu"] = r["tokens_per_s"] * fpt / (r["peak"] * 1e9)
        print(f"{name:<18}{r['wall_s']:>8.1f}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10,.0f}{r['mfu']:>7.1%}"
              f"{r['val_loss']:>10.4f}{r['tokens_per_s'] / base['tokens_per_s']:>14.2f}x"
              f"{base['wall_s'] / r['wall_s']:>13.2f}x")
    print("targets: val loss <= 1.90 in both precisions; faster than the baseline in fp32, much faster in bf16")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
