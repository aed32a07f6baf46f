"""Cross-layer parameter sharing on the bundled corpus: how much of an 8-layer model's quality do M weight
sets keep, in which order, and what do per-layer low-rank deltas add?

    python benchmarks/sharing.py [--steps 600] [--out benchmarks/results/sharing.json]

`python -m launcher` with model=tiny's width (128 wide, 4 heads, sequence 64, tinyshakespeare char), the
same data, steps and seed for every run:
  8 layers, unshared                                   the quality to keep
  8 layers over M = 1, 2, 4 weight sets                x sequence / cycle / cycle_rev (M = 1: one run)
  8 layers over M = 2, 4 (cycle_rev) + lora_rank 8, 16 relaxed sharing
  M layers, unshared (M = 1, 2, 4)                     the same parameter count without sharing
Prints final validation loss, parameters and tokens/s (median over log intervals; same machine, one run of
this script). Expected, to confirm or refute: cycle_rev with M = 4 within 0.03 of the unshared 8-layer
model, and better than the unshared 4-layer model with the same parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from training_runs import REPO, train
LAYERS = 8


def runs() -> dict[str, list[str]]:
    out = {"8 layers": [f"model.num_layers={LAYERS}"]}
    for m in (1, 2, 4):
        for pattern in (("cycle_rev",) if m == 1 else ("sequence", "cycle", "cycle_rev")):
            out[f"8 over {m} {pattern}"] = [f"model.num_layers={LAYERS}", f"model.sharing.unique_layers={m}",
                                            f"model.sharing.pattern={pattern}"]
    for m in (2, 4):
        for r in (8, 16):
            out[f"8 over {m} cycle_rev lora {r}"] = [f"model.num_layers={LAYERS}", f"model.sharing.unique_layers={m}",
                                                     "model.sharing.pattern=cycle_rev", f"model.sharing.lora_rank={r}"]
    for m in (1, 2, 4):
        out[f"{m} layers"] = [f"model.num_layers={m}"]
    return out


def launch(name: str, overrides: list[str], steps: int, eval_interval: int, workdir: Path) -> dict:
    rows, _ = train(name, overrides, steps=steps, eval_interval=eval_interval, workdir=workdir)
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    start = next(r["ranks"][0] for r in rows if r.get("memory") == "start")
    return {"val_loss": val, "final_val_loss": val[max(val)], "tokens_per_s": statistics.median(tps),
            "param_bytes": start["params"]}


def main() -> None:
    table = runs()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-interval", type=int, default=100)
    ap.add_argument("--runs", nargs="*", default=list(table), choices=list(table))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sharing.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            print(f"running {name} ...", flush=True)
            results[name] = launch(name, table[name], args.steps, args.eval_interval, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": args.steps, "runs": results}, indent=1))
    base = results.get("8 layers")
    print(f"\nmodel=tiny width, {args.steps} steps; vs = against the unshared 8-layer model")
    print(f"{'run':28s} {'val loss':>9s} {'vs':>8s} {'params':>9s} {'tokens/s':>9s} {'vs':>6s}")
    for name, r in results.items():
        dv = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base else ""
        dt = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        print(f"{name:28s} {r['final_val_loss']:9.4f} {dv:>8s} {r['param_bytes'] / 4 / 1e6:8.3f}M "
              f"{r['tokens_per_s']:9.0f} {dt:>6s}")


if __name__ == "__main__":
    main()
