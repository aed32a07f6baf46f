"""Adapting the default pretrained model to a task built from the bundled corpus: given the first 64
characters of a speech, name its speaker, among the 10 most frequent speakers (speeches shuffled with a
fixed seed, then split: the last 10% are validation).

    python benchmarks/finetune.py [--base runs/default] [--steps 300] [--out benchmarks/results/finetune.json]

The base is the README's default run (`python -m launcher`: model=tiny, char tokenizer, trained at 64
tokens of context; trained here first when --base has no checkpoint). Every method starts from it, trains
--steps steps at model.seq_length=128 on the same rows, and is evaluated by `python -m gorilla_dist.evaluate`
on the validation rows: exact match of the greedy answer (the speaker's name and <eod>) and the loss on the
answer only; the classification head rows read the same rows' labels (the speaker; the head scores the
last token of the prompt) and report evaluate's accuracy and class cross entropy. Compared in the same run: the majority-class baseline (always the most frequent speaker of
the training rows), zero-shot and 3-shot prompting of the base. Reported per method: val accuracy (exact
match), output-only loss, trainable parameters, checkpoint size (model.safetensors: adapter runs hold their
trainable parameters only) and training tokens/s (median over log intervals).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gorilla_dist.data.loader import bundled_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = 'instruction: "{instruction}\\n--\\n"\noutput: "{output}"\n'
METHODS = {  # name -> (finetune overrides, optimizer lr)
    "full fine-tuning": (["finetune.method=full"], 1e-3),
    "freeze (last 2 layers + final norm)": (["finetune.method=freeze",
                                             "finetune.trainable=['decoder\\.layers\\.[23]\\.',final_layernorm]"], 1e-3),
    "LoRA r=8 (all linears)": (["finetune.method=lora", "finetune.lora.rank=8", "finetune.lora.alpha=16"], 3e-3),
    "prefix tuning (16, MLP 128)": (["finetune.method=prefix", "finetune.virtual_tokens=16",
                                     "finetune.prefix_projection=128", "data.pack=false"], 3e-3),
    "prompt tuning (16 virtual tokens)": (["finetune.method=prompt", "finetune.virtual_tokens=16",
                                           "finetune.init_text=Speaker", "data.pack=false"], 3e-2),
    "classification head (full fine-tuning)": (["finetune.head=classification"], 1e-3),
    "classification head (last 2 layers + final norm)": (["finetune.head=classification", "finetune.method=freeze",
                                                          "finetune.trainable=['decoder\\.layers\\.[23]\\.',final_layernorm]"],
                                                         1e-3),
}


def speaker_rows(top: int = 10, chars: int = 64, seed: int = 0) -> list[dict]:
    speeches = []
    for para in bundled_corpus().read_text().split("\n\n"):
        speaker, sep, speech = para.partition(":\n")
        if sep and speech.strip():
            speeches.append((speaker.strip(), " ".join(speech.split())[:chars]))
    frequent = {s for s, _ in Counter(s for s, _ in speeches).most_common(top)}
    rows = [{"instruction": text, "output": speaker, "label": speaker} for speaker, text in speeches if speaker in frequent]
    random.Random(seed).shuffle(rows)
    return rows


def run(cmd: list[str]) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-4000:]}")
    return proc.stdout


def evaluate(run_dir: Path, data: Path, out: Path, shots: int = 0) -> dict:
    run(["-m", "gorilla_dist.evaluate", f"run.dir={run_dir}", f"data={data}", "split=validation", f"shots={shots}",
         f"out={out}"])
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=REPO / "runs" / "default")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default=None, help="run only the methods whose name contains this text; with --out, "
                                                 "their rows replace those of the existing file, the rest are kept")
    args = ap.parse_args()
    if not (args.base / "checkpoints").is_dir():
        print(f"[bench] training the base model ({args.base}) with the README's command", flush=True)
        run(["-m", "launcher", f"run.dir={args.base}", "logging.wandb.mode=disabled", "logging.progress=false"])
    work = Path(tempfile.mkdtemp(prefix="bench_finetune_"))
    rows = speaker_rows()
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "template.yaml").write_text(TEMPLATE)
    data = work / "speakers"
    run(["-m", "gorilla_dist.data.prepare", f"input={work / 'rows.jsonl'}", f"output={data}", "format=instruction",
         f"template={work / 'template.yaml'}", f"tokenizer={args.base / 'tokenizer.json'}", "workers=1", "progress=false"])
    n_val = max(1, round(len(rows) * 0.1))
    train_rows, val_rows = rows[:-n_val], rows[-n_val:]
    majority = Counter(r["output"] for r in train_rows).most_common(1)[0][0]
    results = {"rows": len(rows), "validation": n_val, "steps": args.steps, "methods": {}}
    if args.only and args.out and args.out.is_file():
        results = json.loads(args.out.read_text())
    results["methods"]["majority class (always " + majority + ")"] = {
        "accuracy": sum(r["output"] == majority for r in val_rows) / n_val}
    common = [f"data.sources=[{{path: {data}}}]", f"checkpoint.init_from={args.base}", "model=tiny",
              "model.seq_length=128", f"train.max_steps={args.steps}", "train.eval_interval=0", "train.sample_tokens=0",
              "checkpoint.interval=0", "logging.wandb.mode=disabled", "logging.progress=false", "optim.warmup_steps=20",
              "data.val_fraction=0.1"]
    for shots in (0, 3) if not args.only else ():
        r = evaluate(args.base, data, work / f"base_{shots}.json", shots)
        results["methods"][f"{shots}-shot prompting of the base"] = {"accuracy": r["exact_match"], "output_loss": r["loss"],
                                                                     "trainable": 0}
    for name, (overrides, lr) in METHODS.items():
        if args.only and args.only not in name:
            continue
        run_dir = work / re.sub(r"[^A-Za-z0-9]+", "_", name)
        out = run(["-m", "launcher", f"run.dir={run_dir}", *common, *overrides, f"optim.lr={lr}", f"optim.min_lr={lr / 10}"])
        trained = re.search(r"\[finetune\] .*?([\d,]+) of ([\d,]+) parameters", out)
        rows_m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        tps = statistics.median(r["tokens_per_s"] for r in rows_m if "tokens_per_s" in r)
        ckpt = next((run_dir / "checkpoints").iterdir())
        r = evaluate(run_dir, data, work / f"{run_dir.name}.json")
        head = "accuracy" in r  # a classification head: accuracy and class cross entropy
        results["methods"][name] = {"accuracy": r["accuracy" if head else "exact_match"],
                                    "class_loss" if head else "output_loss": r["loss"],
                                    "trainable": int(trained[1].replace(",", "")) if trained else None,
                                    "checkpoint_bytes": (ckpt / "model.safetensors").stat().st_size,
                                    "tokens_per_s": tps}
        print(f"[bench] {name}: accuracy {results['methods'][name]['accuracy']:.3f}, loss {r['loss']:.3f}", flush=True)
    print(f"\nspeaker of a speech (10 speakers, {len(train_rows)} train / {n_val} validation rows), "
          f"{args.steps} steps from {args.base}")
    print(f"{'method':<50}{'val acc':>8}{'out loss':>10}{'trainable':>11}{'ckpt KB':>9}{'tok/s':>8}   (* class loss)")
    for name, r in results["methods"].items():
        loss = f"{r['class_loss']:.3f}*" if "class_loss" in r else f"{r.get('output_loss', float('nan')):.3f} "
        print(f"{name:<50}{r['accuracy']:>8.3f}{loss:>11}"
              f"{r.get('trainable') if r.get('trainable') is not None else '-':>11}"
              f"{r['checkpoint_bytes'] / 1024 if 'checkpoint_bytes' in r else float('nan'):>9.0f}"
              f"{r.get('tokens_per_s', float('nan')):>8.0f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
