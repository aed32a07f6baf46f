"""Held-out loss, perplexity and bits per byte of a checkpoint:
`python -m gorilla_dist.evaluate run.dir=... [data=<prepared dir | text/jsonl/parquet files>] [out=<json>]`.

Without `data=`, the run's own validation split (every source of its blend, each reported, plus the
total). With `data=`, a prepared dataset (same tokenizer as the run, checked) or raw files, which are
prepared with the run's tokenizer into a temporary directory first. Samples are the training's
fixed-length windows, packed and masked exactly as in training (data.loader.pack), so `samples=N`
on the run's own data reproduces the val_loss training logged from its first N validation samples.

The loss is training's (gorilla_dist.loss): a softmax over the real vocabulary (the embedding's padding
rows are masked out), so it equals what transformers computes on the exported model.

Instruction data (prepared with format=instruction): one example per sample, the loss over its targets
(outputs, assistant turns) only, and exact match: the prompt (everything before the example's last
target run) is continued greedily with a KV cache until <eod>, and counts when the tokens equal the
reference output and its <eod> exactly.

A model with a classification head (finetune.head=classification) on labelled data: the cross entropy
per labelled example and the accuracy of its highest-scoring class.

A run with several train.objectives, on its own validation split: also every objective's loss (and the
classify / contrastive accuracies), on the samples training's evaluation used, so they equal its last
logged val_* values (evaluate_objectives).

`shots=k` evaluates k-shot prompting of any model, fine-tuned or not: k training examples before each
prompt.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the predicted tokens (an <eod>
counts as one byte: the separator it stands for): unlike perplexity, it compares models with different
tokenizers.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gorilla_dist.errors import DataError, UserError
from gorilla_dist.objectives import is_plain


@dataclass
class EvaluateArgs:
    run_dir: str | None = None
    """The training run's directory (run.dir=...)."""
    checkpoint: str = "latest"
    """latest (newest usable checkpoint) or a checkpoint directory."""
    data: str | None = None
    """None: the run's own validation split. A prepared dataset directory, or text/jsonl/parquet files
    (comma-separated; prepared with the run's tokenizer first)."""
    split: str | None = None
    """validation | all. Default: validation for the run's own data, all for data=."""
    sample_by: str = "document"
    """data= raw .txt files: what one document is: document | paragraph | line (as in prepare)."""
    samples: int | None = None
    """Evaluate only the first N samples of each source (default: all of them)."""
    batch_size: int = 16
    format: str = "text"
    """data= raw files: text | instruction (rows of instruction/input/output or messages, as in prepare)."""
    exact_match: bool = True
    """Instruction data: also generate each example's output greedily and count exact matches."""
    shots: int = 0
    """Instruction data: k-shot prompting: k whole examples (prompt, output, <eod>) of the training split
    (the dataset's other examples with split=all), drawn deterministically per example, go before each
    evaluated example's prompt; only its own output is scored. Shots that do not fit model.seq_length
    are left out (counted and printed; when none fits, an error)."""
    out: str | None = None
    """Also write the results as JSON to this file."""


def token_bytes(tok) -> np.ndarray:
    """UTF-8 bytes each token id stands for (<eod>: 1)."""
    n = tok.vocab_size
    if tok.kind == "char":
        out = np.array([len(c.encode()) for c in tok.chars] + [1], dtype=np.int64)
    elif tok.kind == "byte":
        out = np.ones(n, dtype=np.int64)
    else:
        from gorilla_dist.data.tokenizer import bytes_to_unicode

        alphabet = set(bytes_to_unicode().values())
        out = np.zeros(n, dtype=np.int64)
        for token, i in tok.tok.get_vocab(with_added_tokens=True).items():
            # byte-level BPE: one alphabet character per byte; anything else: its decoded text
            out[i] = len(token) if set(token) <= alphabet else len(tok.decode([i]).encode())
    out[tok.eod] = 1
    return out


@torch.no_grad()
def evaluate_span(model, span, *, eod: int, reset_at_eod: bool, batch_size: int, samples: int | None,
                  bytes_of: np.ndarray, device) -> dict:
    """Summed loss (nats), predicted tokens, their bytes, over the first `samples` windows of `span`."""
    from gorilla_dist.data.loader import pack
    from gorilla_dist.loss import lm_loss_sum

    n = span.samples if samples is None else min(samples, span.samples)
    loss_sum, tokens, nbytes = 0.0, 0, 0
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        windows = np.empty((len(rows), span.seq + 1), dtype=np.int64)
        valid = np.array([span.window(j, windows[r]) for r, j in enumerate(rows)])
        b = pack(windows, valid, np.zeros(len(rows), dtype=np.int64), eod=eod, reset_at_eod=reset_at_eod).to(device)
        batch_sum, batch_count = lm_loss_sum(model, b)
        loss_sum += float(batch_sum)
        tokens += int(batch_count)
        nbytes += int((torch.from_numpy(bytes_of)[b.labels.cpu()] * b.loss_mask.cpu()).sum())
    return {"samples": n, "tokens": tokens, "bytes": nbytes, "loss_sum": loss_sum}


@torch.no_grad()
def evaluate_classes(model, span, *, batch_size: int, samples: int | None, device) -> dict:
    """A classifier on the labelled examples of `span` (an ExampleSpan): summed cross entropy, examples,
    correct argmax, over its first `samples` samples."""
    from gorilla_dist.data.loader import pack
    from gorilla_dist.loss import class_loss_sum

    n = span.samples if samples is None else min(samples, span.samples)
    out = {"samples": n, "examples": 0, "loss_sum": 0.0, "right": 0}
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        windows, seg = np.empty((len(rows), span.seq + 1), dtype=np.int64), np.empty((len(rows), span.seq + 1), np.int32)
        tgt, classes = np.empty_like(windows, dtype=np.uint8), np.empty_like(windows)
        valid = np.array([span.window(j, windows[r], seg[r], tgt[r], classes[r]) for r, j in enumerate(rows)])
        b = pack(windows, valid, np.zeros(len(rows), dtype=np.int64), eod=span.data.eod, reset_at_eod=False,
                 segments=seg, targets=tgt, classes=classes).to(device)
        loss_sum, count, right = (float(x) for x in class_loss_sum(model, b))
        out["loss_sum"] += loss_sum
        out["examples"] += int(count)
        out["right"] += int(right)
    return out


def refuse_empty(name: str, part: dict, args, cfg) -> None:
    """No loss over zero tokens (or zero labelled examples) is reported as a number, nor k-shot numbers
    where no shot fit: each is an error naming why."""
    seq = cfg.model.seq_length
    if part.get("shots") and not part["shots_used"]:
        raise DataError(f"{name}: shots={args.shots}: no shot fits: every example's own tokens leave too little of "
                        f"model.seq_length={seq} for a whole example before it ({part['shots_left_out']:,} shots left "
                        "out); use fewer or shorter shots, or shots=0")
    if "examples" in part:
        if not part["examples"]:
            raise DataError(f"{name}: none of its {part['samples']:,} samples has a labelled example whose last "
                            f"prompt token lies within model.seq_length={seq}")
    elif not part["tokens"]:
        raise DataError(f"{name}: no scored token in its {part['samples']:,} samples: "
                        + (f"every example's prompt is longer than model.seq_length={seq}, so its output is cut off "
                           "(shorter examples, or a model with a longer seq_length)" if "generated" in part else
                           "the loss mask leaves nothing to score"))


def summary(part: dict) -> dict:
    if "examples" in part:  # a classifier
        return {"samples": part["samples"], "examples": part["examples"],
                "loss": part["loss_sum"] / max(part["examples"], 1), "accuracy": part["right"] / max(part["examples"], 1)}
    loss = part["loss_sum"] / max(part["tokens"], 1)
    out = {"samples": part["samples"], "tokens": part["tokens"], "bytes": part["bytes"], "loss": loss,
           "perplexity": math.exp(min(loss, 700.0)),
           "bits_per_byte": part["loss_sum"] / math.log(2) / max(part["bytes"], 1)}
    if part.get("generated"):
        out.update(exact_match=part["exact"] / part["generated"], generated=part["generated"])
    if part.get("shots"):
        out.update(shots=part["shots"], shots_used=part["shots_used"], shots_left_out=part["shots_left_out"])
    return out


@torch.no_grad()
def _shots(ds, example: int, k: int, pool: tuple[int, int], room: int) -> tuple[np.ndarray, int]:
    """The tokens of k examples from the document range `pool` (not `example` itself), drawn by a
    generator seeded with the example's index, fitting in `room` tokens; and how many were left out."""
    a, b = pool
    candidates = np.setdiff1d(np.arange(a, b), [example])
    chosen = np.random.default_rng([0, example]).choice(candidates, size=min(k, len(candidates)), replace=False)
    parts = [ds.read(int(ds.offsets[i]), int(ds.offsets[i + 1])) for i in chosen]
    while parts and sum(len(x) for x in parts) > room:
        parts.pop(0)
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)), k - len(parts)


def evaluate_examples(model, ds, start: int, stop: int, *, cfg, samples: int | None, bytes_of: np.ndarray,
                      exact_match: bool, device, shots: int = 0, pool: tuple[int, int] | None = None) -> dict:
    """Instruction examples of the token range [start, stop): the loss on their targets only (one example
    per sample, padded, as training scores them) and, with exact_match, greedy generation of each
    example's last output from its prompt. shots=k: k examples of the document range `pool` first."""
    from gorilla_dist.data.dataset import ExampleSpan
    from gorilla_dist.data.loader import pack
    from gorilla_dist.inference import caches, sample_ids
    from gorilla_dist.loss import lm_loss_sum

    seq = cfg.model.seq_length
    span = ExampleSpan(ds, start, stop, seq, pack=False, truncate=True)
    n = span.samples if samples is None else min(samples, span.samples)
    out = {"samples": n, "tokens": 0, "bytes": 0, "loss_sum": 0.0, "generated": 0, "exact": 0}
    if shots:
        out.update(shots=shots, shots_used=0, shots_left_out=0)
    window, seg, tgt = (np.empty(seq + 1, dtype=np.int64), np.empty(seq + 1, dtype=np.int32),
                        np.empty(seq + 1, dtype=np.uint8))
    for j in range(n):
        valid = span.window(j, window, seg, tgt)
        if shots:  # k whole examples before this one's prompt: context, not scored
            context, left_out = _shots(ds, int(span.first[j]), shots, pool, seq + 1 - valid)
            out["shots_left_out"] += left_out
            out["shots_used"] += shots - left_out
            c = len(context)
            window[c:c + valid], tgt[c:c + valid] = window[:valid].copy(), tgt[:valid].copy()
            window[:c], tgt[:c], seg[:] = context, 0, 0
            valid += c
            window[valid:], tgt[valid:], seg[valid:] = ds.eod, 0, 1
        b = pack(window[None], np.array([valid]), np.zeros(1, dtype=np.int64), eod=ds.eod, reset_at_eod=False,
                 segments=seg[None], targets=tgt[None]).to(device)
        loss_sum, count = lm_loss_sum(model, b)
        out["loss_sum"] += float(loss_sum)
        out["tokens"] += int(count)
        out["bytes"] += int((torch.from_numpy(bytes_of)[b.labels.cpu()] * b.loss_mask.cpu()).sum())
        if not exact_match:
            continue
        # the last run of targets is the reference; everything before it is the prompt
        targets = tgt[:valid].astype(bool)
        last = valid - int(np.argmin(targets[::-1])) if not targets.all() else 0
        if last == 0 or last >= valid:
            continue  # nothing to prompt with (train_on_inputs data), or no target
        prompt = torch.as_tensor(window[:last], device=device)[None]
        reference = window[last:valid].tolist()
        ids = sample_ids(model, prompt, vocab_size=ds.vocab_size, max_new_tokens=len(reference), seq_length=seq,
                         temperature=0, cache=caches(cfg.model), stop=ds.eod)
        out["generated"] += 1
        out["exact"] += int(ids[0, last:].tolist() == reference)
    return out


def _datasets(args, cfg, run_dir: Path, tmp: Path):
    """[(name, TokenDataset)] to evaluate, and the split."""
    from gorilla_dist.data.dataset import TokenDataset
    from gorilla_dist.data.writer import PrepareArgs, prepare
    from gorilla_dist.data.tokenizer import same_tokenizer

    if args.data is None:
        paths = [s.path for s in cfg.data.sources] if cfg.data.sources else [run_dir / "data"]
        for p in paths:
            if not Path(p).is_dir():
                raise DataError(f"{p}: the run's data is not there any more (moved or deleted), so its validation "
                                "split cannot be read; evaluate other data with data=<prepared directory | text "
                                "files>")
        return [(str(p), TokenDataset(p, verify="size")) for p in paths], args.split or "validation"
    path = Path(args.data)
    for item in args.data.split(","):
        if not glob.glob(item):
            raise DataError(f"data={args.data}: {item} does not exist; expected a prepared dataset directory (with "
                            "meta.json) or text / jsonl / parquet files (comma-separated, globs allowed)")
    if path.is_dir() and (path / "meta.json").is_file():
        ds = TokenDataset(path, verify="checksum")
    else:  # raw files: prepare them with the run's tokenizer
        prepare(PrepareArgs(input=args.data.split(","), output=str(tmp / "data"),
                            tokenizer=str(run_dir / "tokenizer.json"), sample_by=args.sample_by, workers=1,
                            progress=False, format=args.format))
        ds = TokenDataset(tmp / "data", verify="size")
    if not same_tokenizer(ds.path / "tokenizer.json", run_dir / "tokenizer.json"):
        raise DataError(f"data={args.data}: prepared with another tokenizer ({ds.meta['tokenizer']['kind']}, "
                        f"{ds.vocab_size} ids) than this run's; evaluate raw files instead (data=<file>) to "
                        "tokenize them with the run's tokenizer")
    return [(args.data, ds)], args.split or "all"


def evaluate(args) -> dict:
    from gorilla_dist.data.dataset import ExampleSpan, Span
    from gorilla_dist.inference import inference_model
    from gorilla_dist.model.head import is_classifier

    if not args.run_dir:
        raise UserError("run.dir=<run directory> is required")
    if args.split not in (None, "validation", "all"):
        raise UserError(f"split={args.split!r} is not valid; choose validation or all")
    if args.batch_size < 1 or (args.samples is not None and args.samples < 1):
        raise UserError("batch_size= and samples= must be positive")
    run_dir = Path(args.run_dir)
    with inference_model(run_dir, args.checkpoint) as (cfg, ckpt, model, tok), \
            tempfile.TemporaryDirectory(prefix="gorilla-evaluate-") as tmp:
        sets, split = _datasets(args, cfg, run_dir, Path(tmp))
        bytes_of = token_bytes(tok)
        device = next(model.parameters()).device
        parts = {}
        head = is_classifier(model)
        for name, ds in sets:
            a, b = ds.split(cfg.data.val_fraction)[1] if split == "validation" else (0, ds.tokens)
            if head:
                if ds.labels is None:
                    raise DataError(f"{name}: has no labels (rows with a 'label' field, prepared with format=instruction), "
                                    f"which this checkpoint's classification head needs")
                if ds.label_names != cfg.finetune.labels:
                    raise DataError(f"{name}: its classes {ds.label_names} are not the ones the head was trained on, "
                                    f"{cfg.finetune.labels} (in id order)")
                if args.shots:
                    raise UserError(f"shots={args.shots}: prompting does not apply to a classification head")
                span = ExampleSpan(ds, a, b, cfg.model.seq_length, pack=False, truncate=True)
                parts[name] = evaluate_classes(model, span, batch_size=args.batch_size, samples=args.samples,
                                               device=device)
                continue
            if ds.examples:
                docs = np.searchsorted(np.asarray(ds.offsets), ds.split(cfg.data.val_fraction)[0])
                pool = (0, int(docs[1])) if split == "validation" else (0, ds.documents)
                parts[name] = evaluate_examples(model, ds, a, b, cfg=cfg, samples=args.samples, bytes_of=bytes_of,
                                                exact_match=args.exact_match, device=device, shots=args.shots,
                                                pool=pool)
                continue
            if args.shots:
                raise UserError(f"shots={args.shots}: {name} is not instruction data (prepare it with format=instruction)")
            span = Span(ds, a, b, cfg.model.seq_length)
            if span.samples == 0:
                raise DataError(f"{name}: its {split} split has {b - a} tokens, too few for one sample of "
                                f"model.seq_length={cfg.model.seq_length}")
            parts[name] = evaluate_span(model, span, eod=tok.eod, reset_at_eod=cfg.data.reset_at_eod,
                                        batch_size=args.batch_size, samples=args.samples, bytes_of=bytes_of,
                                        device=device)
        for name, p in parts.items():
            refuse_empty(name, p, args, cfg)
        keys = {k for p in parts.values() for k in p} - {"shots"}
        total = {k: sum(p.get(k, 0) for p in parts.values()) for k in keys}
        total["shots"] = args.shots
        step = json.loads((ckpt / "manifest.json").read_text())["step"]
        objectives = cfg.train.objectives
        mixed = not head and not is_plain(objectives) and args.data is None and split == "validation"
        extra = {"objectives": evaluate_objectives(model, cfg, [ds for _, ds in sets], tok, samples=args.samples,
                                                   device=device)} if mixed else {}
    return {"checkpoint": str(ckpt), "step": step, "split": split, **summary(total),
            "sources": {name: summary(p) for name, p in parts.items()}, **extra}


@torch.no_grad()
def evaluate_objectives(model, cfg, datasets, tok, *, samples: int | None, device) -> dict:
    """Every objective of the run's train.objectives on its validation samples, scored as training's
    evaluation scores them (objectives.evaluation_sums): by default on the samples of training's
    evaluation (train.eval_samples, contrastive negatives grouped as there: one group per micro-batch index
    over the ranks), so the numbers equal the val_* values training logged at this checkpoint's step;
    `samples=N`: the first N."""
    from gorilla_dist.config import ParallelDims
    from gorilla_dist.data.loader import ShardData
    from gorilla_dist.objectives.mixture import Objectives, evaluation_sums, evaluation_values

    t, d = cfg.train, cfg.data
    group = t.micro_batch_size * ParallelDims.from_config(cfg).dp
    n = t.eval_samples if samples is None else samples
    weights = [s.weight for s in d.sources] if d.sources else [1.0]
    data = ShardData(datasets, weights, tok, seq_length=cfg.model.seq_length, micro_batch_size=group,
                     global_batch_size=group, dp=1, dp_rank=0, seed=cfg.run.seed, val_fraction=d.val_fraction,
                     reset_at_eod=d.reset_at_eod, pack=d.pack, truncate=d.truncate, objectives=list(t.objectives),
                     device=device)
    objectives = Objectives(list(t.objectives))
    keys, sums = evaluation_sums(model, data, n, objectives)
    return {"samples": n, **evaluation_values(keys, sums.tolist(), objectives.accuracy_keys)}


def report(result: dict) -> str:
    lines = [f"[evaluate] {result['checkpoint']} (step {result['step']}), {result['split']} split:"]
    rows = [*result["sources"].items()] + ([("total", result)] if len(result["sources"]) > 1 else [])
    for name, r in rows:
        if "accuracy" in r:
            lines.append(f"  {name}: accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  ({r['examples']:,} labelled "
                         f"examples)")
            continue
        em = f"  exact match {r['exact_match']:.3f} of {r['generated']:,}" if "exact_match" in r else ""
        if r.get("shots"):
            em += (f"  {r['shots']}-shot: {r['shots_used']:,} shots used, {r['shots_left_out']:,} left out (too long "
                   "for model.seq_length)" if r["shots_left_out"] else f"  {r['shots']}-shot: {r['shots_used']:,} shots")
        lines.append(f"  {name}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
                     f"bits/byte {r['bits_per_byte']:.4f}{em}  ({r['tokens']:,} tokens, {r['samples']:,} samples)")
    if "objectives" in result:
        o = result["objectives"]
        lines.append(f"  objectives ({o['samples']:,} samples, each objective on its own view of them):")
        lines += [f"    {key[4:]}: {value:.4f}" for key, value in o.items() if key.startswith("val_")]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import parse_key_values, run_tool
    from gorilla_dist.files import write_text_atomic
    from gorilla_dist.runtime import quiet_libraries

    def body() -> int:
        args = parse_key_values(argv, EvaluateArgs, aliases={"run.dir": "run_dir"})
        if args.out and Path(args.out).exists():
            raise UserError(f"out={args.out} already exists; not overwriting it")
        result = evaluate(args)
        print(report(result), flush=True)
        if args.out:
            os.makedirs(Path(args.out).parent, exist_ok=True)
            write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
        return 0

    quiet_libraries()
    return run_tool(body)


if __name__ == "__main__":
    from gorilla_dist.engine.startup import exit_now

    exit_now(main(sys.argv[1:]))  # skips the interpreter's slow finalization (engine/startup.exit_now)
