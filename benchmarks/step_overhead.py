"""Step overhead: host syncs and operations per step, ZeRO stage step times, and nanoGPT side by side.

    python benchmarks/step_overhead.py [--parts syncs,zero,nanogpt,small] [--small-iters 50] [--out F.json]

All ratios come from this one run on this machine:
  syncs    host syncs and aten operations per optimizer step (engine/syncs.py SyncCounter), model=tiny,
           one process, for fp32/bf16 x ZeRO 0-3: "before" is DeepSpeed as it comes (torch's AdamW and
           LambdaLR handed to deepspeed.initialize, with our config), "after" is gorilla_dist's train_step.
  zero     step time of ZeRO 0/1/2/3 at model=small on 2 ranks (launch=torchrun), fp32, through the
           launcher; ratio against ZeRO-0.
  nanogpt  the default run (nanoGPT's shakespeare-char CPU configuration, 2000 iterations) as two whole
           programs timed from outside, start-up included: `python -m launcher` vs the nanoGPT baseline
           program (benchmarks/nanogpt_baseline.py), fp32. Target: ours <= 0.9x nanoGPT's wall, val <= 1.90.
  small    nanoGPT's larger shakespeare-char configuration (6 layers, 6 heads, 384 wide, block 256,
           batch 64, dropout 0.2) in fp32 and bf16 (nanoGPT: its autocast), tokens/s after 2 warm-up
           iterations. Targets: ours/nanoGPT >= 1.0 in each precision, our bf16/fp32 >= 2.
The header says whether this CPU has native bf16 (avx512_bf16 / amx_bf16) and the measured matmul
ratio; without it bf16 runs emulated and every bf16 number here says so.
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
COMMON = ["train.sample_tokens=0", "checkpoint.interval=0", "logging.wandb.mode=disabled", "logging.progress=false",
          "logging.plot=false"]


def cpu_header() -> dict:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    native = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in flags]

    def gflops(dtype) -> float:
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        return 5 * 2 * 1024 ** 3 / (time.perf_counter() - start) / 1e9

    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    return {"threads": torch.get_num_threads(), "native_bf16": native, "matmul_gflops_fp32": round(fp32),
            "matmul_gflops_bf16": round(bf16), "bf16_case": "native" if native and bf16 > fp32 else "emulated"}


# --- syncs -------------------------------------------------------------------------------------------

def _world1():
    from gorilla_dist.parallel import init_single_process
    from gorilla_dist.runtime import quiet_libraries

    quiet_libraries()
    return init_single_process()


def _cfg(dtype: str, zero: int, size: str = "tiny"):
    from omegaconf import OmegaConf

    from gorilla_dist.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / f"conf/model/{size}.yaml"))
    cfg.precision.dtype, cfg.parallel.zero_stage = dtype, zero
    cfg.train.global_batch_size = cfg.train.micro_batch_size = 12  # the default run's batch, one process
    return cfg


def _batches(cfg, n: int, vocab: int = 66):
    from gorilla_dist.data.loader import pack

    s, b = cfg.model.seq_length, cfg.train.micro_batch_size
    rng = np.random.default_rng(0)
    return [pack(rng.integers(0, vocab - 1, (b, s + 1)), np.full(b, s + 1), np.zeros(b, int), eod=vocab - 1,
                 reset_at_eod=False) for _ in range(n)]


def _deepspeed_as_is(cfg, layout):
    """deepspeed.initialize with torch's AdamW and LambdaLR, as a DeepSpeed user would write it."""
    import deepspeed
    import torch

    from gorilla_dist.engine.deepspeed_engine import MegatronMPU, deepspeed_config
    from gorilla_dist.model import build_model
    from gorilla_dist.optim import lr_at, param_groups

    o = cfg.optim
    model = build_model(cfg.model, vocab_size=66, dtype=cfg.precision.dtype, device=layout.device, seed=1)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, cfg.train.max_steps) / o.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, mpu=MegatronMPU(),
                                           config=deepspeed_config(optim=o, train=cfg.train, zero_stage=cfg.parallel.zero_stage,
                                                                   precision=cfg.precision, dp=1))
    return engine


def part_syncs(results: dict) -> None:
    from gorilla_dist.engine import build_engine
    from gorilla_dist.engine.syncs import SyncCounter
    from gorilla_dist.loss import lm_loss
    from gorilla_dist.model import build_model
    from gorilla_dist.train import train_step

    layout = _world1()
    rows = {}
    for dtype in ("fp32", "bf16"):
        for zero in range(4):
            cfg = _cfg(dtype, zero)
            batches = _batches(cfg, 6)
            ds = _deepspeed_as_is(cfg, layout)

            def before(batch):
                loss = lm_loss(ds, batch)
                ds.backward(loss)
                ds.step()
                return ds.skipped_steps, ds.get_global_grad_norm()  # what a loop reads after a step

            model = build_model(cfg.model, vocab_size=66, dtype=dtype, device=layout.device, seed=1)
            ours = build_engine(model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel,
                                precision=cfg.precision, layout=layout)
            row = {}
            for name, step in (("before", before), ("after", lambda b: train_step(ours, [b]))):
                for b in batches[:3]:  # warm-up (ZeRO-3 records its module trace in its first steps)
                    step(b)
                with SyncCounter() as c:
                    for b in batches[3:]:
                        step(b)
                row[name] = {"syncs": c.total / 3, "ops": c.ops / 3,
                             "sites": {k: v / 3 for k, v in c.sites.most_common(4)}}
            rows[f"{dtype} zero{zero}"] = row
            print(f"{dtype} ZeRO-{zero}: syncs/step {row['before']['syncs']:g} -> {row['after']['syncs']:g}; "
                  f"aten ops/step {row['before']['ops']:.0f} -> {row['after']['ops']:.0f}", flush=True)
    results["syncs"] = rows


# --- launcher runs ------------------------------------------------------------------------------------

def launch(run_dir: Path, *overrides: str) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", f"run.dir={run_dir}", *COMMON, *overrides], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"run {overrides} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interval_tokens_per_s(rows: list[dict], every: int) -> float:
    """Median tokens/s over logged intervals, the first (warm-up) left out."""
    values = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] % every == 0][1:]
    return statistics.median(values)


def part_zero(results: dict, work: Path) -> None:
    rows = {}
    for zero in range(4):
        _, metrics = launch(work / f"zero{zero}", "model=small", "launch=torchrun", "launch.nproc_per_node=2",
                            f"parallel.zero_stage={zero}", "train.max_steps=16", "train.log_interval=4",
                            "train.eval_interval=0")
        tps = interval_tokens_per_s(metrics, 4)
        rows[f"zero{zero}"] = {"step_s": 12 * 256 / tps, "tokens_per_s": tps}
        print(f"model=small, 2 ranks, ZeRO-{zero}: {rows[f'zero{zero}']['step_s']:.3f} s/step "
              f"({rows[f'zero{zero}']['step_s'] / rows['zero0']['step_s']:.2f}x ZeRO-0)", flush=True)
    results["zero"] = rows


def nanogpt_files(work: Path) -> int:
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters, 90% train, as uint16 files."""
    from gorilla_dist.data.loader import bundled_corpus

    text = bundled_corpus().read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(work / "train.bin")
    ids[n:].tofile(work / "val.bin")
    return len(chars)


def nanogpt(work: Path, vocab: int, *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/nanogpt_baseline.py"), str(work / "train.bin"),
                           str(work / "val.bin"), f"--vocab={vocab}", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"nanoGPT {args} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def part_nanogpt(results: dict, work: Path, vocab: int, iters: int) -> None:
    base_wall, base = nanogpt(work, vocab, f"--iters={iters}")
    ours_wall, rows = launch(work / "default", f"train.max_steps={iters}")
    ours_val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    results["nanogpt"] = {"nanogpt": {"wall_s": base_wall, "val_loss": base["val_losses"][-1][1]},
                          "ours": {"wall_s": ours_wall, "val_loss": ours_val}}
    print(f"default run, {iters} iterations, whole programs: ours {ours_wall:.1f} s (val {ours_val:.4f}) vs nanoGPT "
          f"{base_wall:.1f} s (val {base['val_losses'][-1][1]:.4f}): {ours_wall / base_wall:.2f}x its wall", flush=True)


def part_small(results: dict, work: Path, vocab: int, iters: int) -> None:
    rows = {}
    shape = ["--block=256", "--batch=64", "--n_layer=6", "--n_head=6", "--n_embd=384", "--dropout=0.2",
             "--eval_interval=100000", "--eval_iters=1"]
    for dtype in ("fp32", "bf16"):
        _, base = nanogpt(work, vocab, f"--iters={iters + 2}", f"--dtype={dtype}", *shape)
        base_tps = 64 * 256 / statistics.median(base["step_times"][2:])
        _, metrics = launch(work / f"small_{dtype}", "model=small", f"precision={dtype}", f"train.max_steps={iters + 2}",
                            "train.global_batch_size=64", "train.micro_batch_size=64", "train.log_interval=2",
                            "train.eval_interval=0", "optim.warmup_steps=2")
        tps = interval_tokens_per_s(metrics, 2)
        rows[dtype] = {"nanogpt_tokens_per_s": base_tps, "ours_tokens_per_s": tps}
        print(f"small config {dtype}: ours {tps:,.0f} tokens/s vs nanoGPT {base_tps:,.0f} ({tps / base_tps:.2f}x)",
              flush=True)
    rows["bf16_over_fp32"] = {"ours": rows["bf16"]["ours_tokens_per_s"] / rows["fp32"]["ours_tokens_per_s"],
                              "nanogpt": rows["bf16"]["nanogpt_tokens_per_s"] / rows["fp32"]["nanogpt_tokens_per_s"]}
    print(f"bf16/fp32: ours {rows['bf16_over_fp32']['ours']:.2f}x, nanoGPT {rows['bf16_over_fp32']['nanogpt']:.2f}x")
    results["small"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="syncs,zero,nanogpt,small")
    ap.add_argument("--iters", type=int, default=2000, help="iterations of the default-run comparison")
    ap.add_argument("--small-iters", type=int, default=50, help="timed iterations of the larger configuration")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = args.parts.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    results = {"cpu": cpu_header()}
    print(f"[bench] {results['cpu']}", flush=True)
    vocab = nanogpt_files(work)
    if "syncs" in parts:
        part_syncs(results)
    if "zero" in parts:
        part_zero(results, work)
    if "nanogpt" in parts:
        part_nanogpt(results, work, vocab, args.iters)
    if "small" in parts:
        part_small(results, work, vocab, args.small_iters)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
