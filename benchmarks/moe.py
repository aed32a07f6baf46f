"""Mixture of experts on the bundled corpus: does an MoE with the dense model's active parameters reach a
lower validation loss, do the balancing methods balance, and does expert parallelism split the expert
state?

    python benchmarks/moe.py [--steps 600] [--ep-steps 60] [--out benchmarks/results/moe.json]

Runs `python -m launcher` (model=tiny: 4 layers, 128 wide, MLP 512; tinyshakespeare, char) with the same
data, steps and seed for:
  dense             the baseline
  moe               8 experts of width 256, top-2 (Mixtral's softmax router): the same active MLP
                    parameters per token as dense (2 x 256 = 512), 8x the MLP parameters; aux loss 1e-2
  moe no-aux        the same without the load-balancing loss (z-loss kept): for contrast
  moe expert-bias   sigmoid router + DeepSeek-V3's aux-loss-free expert bias instead of the aux loss
and, on 2 ranks (torchrun, ZeRO-0, fp32), the MoE at ep=1 and ep=2 for a few steps: tokens/s and each
rank's parameter + optimizer bytes (the experts' should halve).

Prints, per run: final validation loss, median tokens/s (same machine, same run of this script), and the
expert load after warm-up: the mean over the second half's log intervals of max_expert(load) / mean load
(moe_load_max; target <= 1.3 with a balancing method).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from training_runs import REPO, train
MOE = ["model.moe.num_experts=8", "model.moe.topk=2", "model.moe.ffn_hidden_size=256"]
RUNS = {
    "dense": [],
    "moe": MOE,
    "moe no-aux": [*MOE, "model.moe.aux_loss_coeff=0"],
    "moe expert-bias": [*MOE, "model.moe.router=sigmoid", "model.moe.expert_bias=true", "model.moe.aux_loss_coeff=0"],
}
EP_RUNS = {
    "moe ep=1 (2 ranks)": [*MOE, "launch=torchrun", "launch.nproc_per_node=2"],
    "moe ep=2 (2 ranks)": [*MOE, "launch=torchrun", "launch.nproc_per_node=2", "parallel.ep=2"],
}


def summarize(rows: list[dict], steps: int) -> dict:
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first interval holds start-up
    late = [r["moe_load_max"] for r in rows if "moe_load_max" in r and r["step"] > steps // 2]
    memory = next((r["ranks"] for r in rows if r.get("memory") == "first_step"), [])
    return {"val_loss": val, "final_val_loss": val[max(val)] if val else None,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "load_max_over_mean": statistics.mean(late) if late else None,
            "aux_loss_last": next((r["moe_aux_loss"] for r in reversed(rows) if "moe_aux_loss" in r), None),
            "per_rank_params_plus_optimizer_bytes": [r["params"] + r["optimizer"] for r in memory]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--ep-steps", type=int, default=60)
    ap.add_argument("--runs", nargs="*", default=[*RUNS, *EP_RUNS], choices=[*RUNS, *EP_RUNS])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            print(f"running {name} ...", flush=True)
            if name in RUNS:
                rows, _ = train(name, RUNS[name], steps=args.steps, eval_interval=args.eval_interval, workdir=Path(tmp))
                results[name] = summarize(rows, args.steps)
            else:
                rows, _ = train(name, EP_RUNS[name], steps=args.ep_steps, eval_interval=0, workdir=Path(tmp))
                results[name] = summarize(rows, args.ep_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "ep_steps": args.ep_steps, "runs": results}, indent=1))

    base = results.get("dense")
    print(f"\nmodel=tiny, {args.steps} steps, global batch 12 x 64 tokens; MoE: 8 experts x 256 wide, top-2 "
          "(same active MLP parameters as dense)")
    print(f"{'run':24s} {'val loss':>9s} {'vs dense':>9s} {'tokens/s':>9s} {'vs dense':>9s} {'max load/mean':>14s}")
    for name in RUNS:
        if name not in results:
            continue
        r = results[name]
        dv = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base and r["final_val_loss"] else ""
        dt = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        load = f"{r['load_max_over_mean']:.3f}" if r["load_max_over_mean"] else "-"
        print(f"{name:24s} {r['final_val_loss']:9.4f} {dv:>9s} {r['tokens_per_s']:9.0f} {dt:>9s} {load:>14s}")
    ep1, ep2 = results.get("moe ep=1 (2 ranks)"), results.get("moe ep=2 (2 ranks)")
    if ep1 and ep2:
        b1, b2 = max(ep1["per_rank_params_plus_optimizer_bytes"]), max(ep2["per_rank_params_plus_optimizer_bytes"])
        print(f"\n2 ranks, {args.ep_steps} steps: ep=2 vs ep=1 tokens/s {ep2['tokens_per_s'] / ep1['tokens_per_s']:.2f}x "
              f"({ep2['tokens_per_s']:.0f} vs {ep1['tokens_per_s']:.0f}); per-rank params + optimizer "
              f"{b2 / 2**20:.2f} vs {b1 / 2**20:.2f} MiB ({b2 / b1:.2f}x)")


if __name__ == "__main__":
    main()
