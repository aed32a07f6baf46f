"""CLM alone against a mixture of pretraining objectives, the same number of steps on the bundled corpus.

    python benchmarks/objectives.py [--steps 600] [--out benchmarks/results/objectives.json]

The corpus is split into two sources (its first and second half: different plays), prepared with the
char tokenizer and special_tokens=objectives; both runs train model=tiny (the README's default) on them
with the same seed, steps and batch. The mixture: clm 0.6, denoise R 0.1 (mean span 3, rate 0.15),
denoise S 0.1 (rate 0.25), permute 0.1, contrastive 0.05, classify 0.05. Reported: the validation
language-model loss (`val_loss`: every validation sample, plain, in both runs), the mixture's own
validation numbers per objective, and tokens/s (median over log intervals; the mixture's samples carry
the same number of positions, so tokens/s compares the cost of a step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIXTURE = ("[{name: clm, weight: 0.6}, {name: denoise, mode: R, weight: 0.1}, "
           "{name: denoise, mode: S, rate: 0.25, weight: 0.1}, {name: permute, weight: 0.1}, "
           "{name: contrastive, weight: 0.05}, {name: classify, weight: 0.05}]")


def run(cmd: list[str]) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_objectives_"))
    text = (REPO / "gorilla_dist" / "data" / "tinyshakespeare.txt").read_text()
    half = text.index("\n\n", len(text) // 2)
    (work / "first.txt").write_text(text[:half])
    (work / "second.txt").write_text(text[half + 2:])
    run(["-m", "gorilla_dist.data.prepare", f"input={work / 'first.txt'},{work / 'second.txt'}",
         f"output={work / 'both'}", "tokenizer=char", "workers=1", "progress=false"])  # one vocabulary for both
    for name in ("first", "second"):
        run(["-m", "gorilla_dist.data.prepare", f"input={work / name}.txt", f"output={work / name}",
             f"tokenizer={work / 'both' / 'tokenizer.json'}", "special_tokens=objectives", "sample_by=paragraph",
             "workers=1", "progress=false"])
    common = [f"data.sources=[{{path: {work / 'first'}}}, {{path: {work / 'second'}}}]", f"train.max_steps={args.steps}",
              f"train.eval_interval={args.steps}", "train.sample_tokens=0", "checkpoint.interval=0",
              "logging.wandb.mode=disabled", "logging.progress=false"]
    results = {"steps": args.steps, "runs": {}}
    for name, extra in (("clm only", []), ("mixture", [f"train.objectives={MIXTURE}"])):
        run_dir = work / name.replace(" ", "_")
        run(["-m", "launcher", f"run.dir={run_dir}", *common, *extra])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in rows if "val_loss" in r][-1]
        results["runs"][name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows
                                                                   if "tokens_per_s" in r),
                                 **{k: v for k, v in final.items() if k.startswith("val_")}}
        print(f"[bench] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results["runs"][name].items()), flush=True)
    base, mix = results["runs"]["clm only"], results["runs"]["mixture"]
    results["tokens_per_s_ratio"] = mix["tokens_per_s"] / base["tokens_per_s"]
    print(f"\n{args.steps} steps of model=tiny on the bundled corpus (2 sources), 2 cores")
    print(f"{'':<12}{'val_loss (LM)':>14}{'tokens/s':>10}")
    for name, r in results["runs"].items():
        print(f"{name:<12}{r['val_loss']:>14.4f}{r['tokens_per_s']:>10.0f}")
    print(f"mixture / clm only: tokens/s {results['tokens_per_s_ratio']:.2f}x, val_loss "
          f"{mix['val_loss'] - base['val_loss']:+.4f}")
    print("mixture's own validation numbers: " + ", ".join(f"{k} {v:.4f}" for k, v in mix.items()
                                                           if k not in ("val_loss", "tokens_per_s")))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
