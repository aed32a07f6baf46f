"""CLM alone against a mixture of pretraining objectives, the same number of steps on the bundled corpus.

    python benchmarks/objectives.py [--steps 600] [--out benchmarks/results/objectives.json] [--mixture '[...]']

The corpus is split into two sources (its first and second half: different plays), prepared with the
char tokenizer and special_tokens=objectives; both runs train model=tiny (the README's default) on them
with the same seed, steps and batch. The mixture: clm 0.6, denoise R 0.1 (mean span 3, rate 0.15),
denoise S 0.1 (rate 0.25), permute 0.1, contrastive 0.05, classify 0.05. Reported: the validation
language-model loss (`val_loss`: every validation sample, plain, in both runs), the mixture's own
validation numbers per objective, and tokens/s (median over log intervals; the mixture's samples carry
the same number of positions, so tokens/s compares the cost of a step).

Then what each model does on tasks nobody fine-tuned it for, scored in this process on its last checkpoint:
  - span infilling: 3-character spans of the second source's validation text (the last 10% of its
    documents), 300 of them, each with 28 characters on either side. The mixture model reads them in its
    R-denoiser layout ([<|mode:R|>] left <sentinel 0> right <sentinel 1>, bidirectional, then <sentinel 0>
    and the span: training's corruption always ends with a span, as T5's does);
    the CLM-only model has only the left side (it never learnt the layout). Teacher-forced: the share of
    span characters whose argmax is right, and of spans with all three right.
  - linear probe: the speaker of a speech (benchmarks/finetune.py's rows: its first 64 characters, the 10
    most frequent speakers; first 90% train, last 10% validation) from the frozen model's final hidden
    states mean-pooled over the speech, by a logistic regression (full-batch L-BFGS, weight decay 1e-3);
    validation accuracy, beside the majority class.
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


SPAN, SIDE, PROBES = 3, 28, 300


def _hidden_hook(model):
    """Keep the decoder's output (final-normed hidden states, (s, b, h)) of the next forward."""
    kept = {}
    handle = model.decoder.register_forward_hook(lambda _m, _a, out: kept.__setitem__("h", out))
    return kept, handle


def infilling(model, tok, text: str, layout: bool) -> dict:
    """Teacher-forced infilling of PROBES spans of `text` (see the docstring); layout: the R denoiser's
    ([mode] left <s0> right, bidirectional | <s0> span), else the left side then the span (causal)."""
    import numpy as np
    import torch

    from gorilla_dist.kernels.limits import BIDIRECTIONAL

    rng = np.random.default_rng(0)
    starts = rng.choice(len(text) - 2 * SIDE - SPAN, size=PROBES, replace=False)
    right_chars = total = exact = 0
    with torch.no_grad():
        for a in starts.tolist():
            left, span = tok.encode(text[a:a + SIDE]), tok.encode(text[a + SIDE:a + SIDE + SPAN])
            right = tok.encode(text[a + SIDE + SPAN:a + 2 * SIDE + SPAN])
            if layout:  # as in training, the input ends with a sentinel (T5's corruption ends with a span)
                s0, s1 = tok.special_id("<|sentinel:0|>"), tok.special_id("<|sentinel:1|>")
                inputs = [tok.special_id("<|mode:R|>"), *left, s0, *right, s1]
                ids = inputs + [s0, *span]
                seg = torch.tensor([[BIDIRECTIONAL] * len(inputs) + [0] * (len(ids) - len(inputs))])
            else:
                ids, seg = [*left, *span], None
            x = torch.tensor([ids])
            logits = model(x, torch.arange(len(ids))[None], seg)[0]
            guess = logits[len(ids) - len(span) - 1:len(ids) - 1].argmax(-1).tolist()
            hits = sum(int(g == t) for g, t in zip(guess, span.tolist()))
            right_chars, total, exact = right_chars + hits, total + len(span), exact + int(hits == len(span))
    return {"char_accuracy": right_chars / total, "span_exact": exact / PROBES}


def linear_probe(model, tok, rows: list[dict]) -> dict:
    """Speaker of a speech from the frozen model's mean-pooled final hidden states (see the docstring)."""
    import torch

    names = sorted({r["label"] for r in rows})
    feats, labels = [], []
    kept, handle = _hidden_hook(model)
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor(tok.encode(r["instruction"]))[None]
            model(ids, torch.arange(ids.shape[1])[None], None)
            feats.append(kept["h"][:, 0].float().mean(0))
            labels.append(names.index(r["label"]))
    handle.remove()
    x, y = torch.stack(feats), torch.tensor(labels)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = int(len(rows) * 0.9)
    w = torch.zeros(x.shape[1], len(names), requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float(((x[cut:] @ w + b).argmax(-1) == y[cut:]).float().mean())
    majority = max(int((y[cut:] == c).sum()) for c in range(len(names))) / (len(rows) - cut)
    return {"probe_accuracy": acc, "majority": majority, "train_rows": cut, "val_rows": len(rows) - cut}


def downstream(run_dir: Path, text: str, rows: list[dict], layout: bool) -> dict:
    from gorilla_dist.inference import inference_model

    with inference_model(run_dir) as (_cfg, _ckpt, model, tok):
        return {**infilling(model, tok, text, layout), **linear_probe(model, tok, rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mixture", default=MIXTURE, help="train.objectives of the second run (default: the docstring's)")
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
    results["mixture"] = args.mixture
    for name, extra in (("clm only", []), ("mixture", [f"train.objectives={args.mixture}"])):
        run_dir = work / name.replace(" ", "_")
        run(["-m", "launcher", f"run.dir={run_dir}", *common, *extra])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in rows if "val_loss" in r][-1]
        results["runs"][name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows
                                                                   if "tokens_per_s" in r),
                                 **{k: v for k, v in final.items() if k.startswith("val_")}}
        print(f"[bench] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results["runs"][name].items()), flush=True)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from finetune import speaker_rows

    second = (work / "second.txt").read_text()
    val_text = second[second.index("\n\n", int(len(second) * 0.9)) + 2:]
    rows = speaker_rows()
    for name in results["runs"]:
        got = downstream(work / name.replace(" ", "_"), val_text, rows, layout=name == "mixture")
        results["runs"][name]["downstream"] = got
        print(f"[bench] {name} downstream: " + ", ".join(f"{k} {v:.4f}" for k, v in got.items()), flush=True)
    base, mix = results["runs"]["clm only"], results["runs"]["mixture"]
    results["tokens_per_s_ratio"] = mix["tokens_per_s"] / base["tokens_per_s"]
    print(f"\n{args.steps} steps of model=tiny on the bundled corpus (2 sources), 2 cores")
    print(f"{'':<12}{'val_loss (LM)':>14}{'tokens/s':>10}")
    for name, r in results["runs"].items():
        print(f"{name:<12}{r['val_loss']:>14.4f}{r['tokens_per_s']:>10.0f}")
    print(f"mixture / clm only: tokens/s {results['tokens_per_s_ratio']:.2f}x, val_loss "
          f"{mix['val_loss'] - base['val_loss']:+.4f}")
    print("mixture's own validation numbers: " + ", ".join(f"{k} {v:.4f}" for k, v in mix.items()
                                                           if k not in ("val_loss", "tokens_per_s", "downstream")))
    print(f"{'':<12}{'infill chars':>13}{'infill spans':>13}{'probe acc':>10}{'majority':>9}")
    for name, r in results["runs"].items():
        d = r["downstream"]
        print(f"{name:<12}{d['char_accuracy']:>13.3f}{d['span_exact']:>13.3f}{d['probe_accuracy']:>10.3f}"
              f"{d['majority']:>9.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
