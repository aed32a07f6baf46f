"""Data pipeline throughput: prepare (MB/s, one core and all cores) and the loader (tokens/s).

    python benchmarks/data.py [--mb 200] [--vocab 8192] [--batches 2000]

Corpus: the bundled tinyshakespeare repeated to --mb megabytes, as 8 .txt files, one document per
paragraph. Tokenizer: a byte-level BPE trained once on the first 20 MB (`bpe:<vocab>`), then passed as
a tokenizer.json to every timed run so they all tokenize the same way.

Baselines measured in the same run:
  prepare  the Hugging Face tokenizer alone: `Tokenizer.encode_batch_fast` over the paragraphs already in
           memory, in this one process, with no reading or writing (what the library costs by itself)
  loader   nanoGPT's get_batch: random windows of one np.memmap, stacked into torch tensors
Targets (issue 4): prepare >= 5 MB/s per core with byte-level BPE; loader >= 20 M tokens/s in one process
(batches of 8 x 2048). Issue 16: the same for packed instruction examples (whole examples, per-example
positions, segment ids and loss masks; rows = consecutive paragraph pairs of the corpus, ~5 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gorilla_dist.data.dataset import TokenDataset  # noqa: E402
from gorilla_dist.data.loader import ShardData, bundled_corpus  # noqa: E402
from gorilla_dist.data.writer import PrepareArgs, prepare  # noqa: E402
from gorilla_dist.data.tokenizer import load_tokenizer  # noqa: E402

SEQ, BATCH = 2048, 8


def build_corpus(root: Path, mb: int, files: int = 8) -> Path:
    text = bundled_corpus().read_text()
    copies = -(-mb * 10**6 // (len(text.encode()) * files))
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(files):
        with open(corpus / f"part{i}.txt", "w") as f:
            for _ in range(copies):
                f.write(text + "\n\n")
    return corpus


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenizer pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    start, cpu = time.perf_counter(), cpu_seconds()
    meta = prepare(PrepareArgs(input=[str(corpus)], output=str(out), tokenizer=tokenizer, sample_by="paragraph",
                               workers=workers, progress=False))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    return {"workers": workers, "seconds": seconds, "mb_per_s": mb / seconds, "mb_per_cpu_s": mb / cpu,
            "tokens": meta["tokens"]}


def tokenizer_alone(tok_json: Path, mb: float) -> float:
    """MB/s of the library's encode_batch_fast on in-memory paragraphs, one process, one thread."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tok_json).tok  # the tokenizers.Tokenizer itself
    paragraphs = [p + "\n" for p in bundled_corpus().read_text().split("\n\n")]
    size = sum(len(p.encode()) for p in paragraphs) / 1e6
    reps = max(1, int(mb / size))
    start = time.perf_counter()
    for _ in range(reps):
        tok.encode_batch_fast(paragraphs, add_special_tokens=False)
    return reps * size / (time.perf_counter() - start)


def time_loader(path: Path, batches: int, reset_at_eod: bool = False) -> float:
    data = ShardData([TokenDataset(path, verify="size")], [1.0], load_tokenizer(path), seq_length=SEQ,
                     micro_batch_size=BATCH, global_batch_size=BATCH, dp=1, dp_rank=0, seed=0, val_fraction=0.01,
                     reset_at_eod=reset_at_eod)
    for _ in range(10):
        data.next_train_batches()
    start = time.perf_counter()
    for _ in range(batches):
        data.next_train_batches()
    return batches * BATCH * SEQ / (time.perf_counter() - start)


def instruction_dataset(root: Path, tok_json: Path, mb: float = 5.0) -> Path:
    """Rows {instruction: paragraph i, output: paragraph i + 1} of the corpus, prepared with format=instruction."""
    paragraphs = [p for p in bundled_corpus().read_text().split("\n\n") if p.strip()]
    rows, size = root / "rows.jsonl", 0
    with open(rows, "w") as f:
        while size < mb * 1e6:
            for a, b in zip(paragraphs[:-1], paragraphs[1:]):
                line = json.dumps({"instruction": a, "output": b}) + "\n"
                f.write(line)
                size += len(line)
    prepare(PrepareArgs(input=[str(rows)], output=str(root / "instruct"), tokenizer=str(tok_json),
                        format="instruction", workers=1, progress=False))
    return root / "instruct"


def nanogpt_get_batch(path: Path, batches: int) -> float:
    meta = json.loads((path / "meta.json").read_text())
    data = np.memmap(path / meta["shards"][0]["file"], dtype=np.dtype(meta["dtype"]), mode="r")
    start = time.perf_counter()
    for _ in range(batches):
        ix = torch.randint(len(data) - SEQ, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i:i + SEQ].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + SEQ].astype(np.int64)) for i in ix])
        del x, y
    return batches * BATCH * SEQ / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--vocab", type=int, default=8192, help="byte-level BPE vocabulary")
    ap.add_argument("--batches", type=int, default=2000, help="loader batches to time")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        corpus = build_corpus(root, args.mb)
        mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
        print(f"[bench] corpus: {mb:.0f} MB in {len(list(corpus.iterdir()))} files; {cores} cores", flush=True)

        start = time.perf_counter()
        sample = root / "sample.txt"
        shutil.copyfile(corpus / "part0.txt", sample)
        prepare(PrepareArgs(input=[str(sample)], output=str(root / "bpe"), tokenizer=f"bpe:{args.vocab}",
                            sample_by="paragraph", bpe_train_mb=20, workers=1, progress=False))
        bpe_train_s = time.perf_counter() - start
        tok_json = root / "bpe" / "tokenizer.json"
        print(f"[bench] trained bpe:{args.vocab} on 20 MB in {bpe_train_s:.1f} s", flush=True)

        results = {"corpus_mb": mb, "cores": cores, "bpe_train_s": bpe_train_s}
        results["tokenizer_alone_mb_per_s"] = tokenizer_alone(tok_json, 20)
        print(f"[bench] baseline, HF encode_batch_fast alone: {results['tokenizer_alone_mb_per_s']:.2f} MB/s", flush=True)
        runs = [1] + ([cores] if cores > 1 else [])
        for workers in runs:
            r = time_prepare(corpus, root / f"out_w{workers}", str(tok_json), workers)
            results[f"prepare_w{workers}"] = r
            print(f"[bench] prepare, {workers} worker(s): {r['seconds']:.1f} s, {r['mb_per_s']:.2f} MB/s, "
                  f"{r['tokens']:,} tokens", flush=True)
        dataset = root / f"out_w{runs[-1]}"
        results["loader_tokens_per_s"] = time_loader(dataset, args.batches)
        results["loader_reset_tokens_per_s"] = time_loader(dataset, max(20, args.batches // 20), reset_at_eod=True)
        results["nanogpt_tokens_per_s"] = nanogpt_get_batch(dataset, args.batches)
        results["loader_packed_tokens_per_s"] = time_loader(instruction_dataset(root, tok_json),
                                                            max(20, args.batches // 4))

        base = results["tokenizer_alone_mb_per_s"]
        print(f"\nprepare: {mb:.0f} MB, byte-level BPE {args.vocab}, {cores} cores "
              "(MB per CPU-second counts the reading/writing process and the tokenizer pool)")
        print(f"{'run':<38}{'MB/s':>8}{'MB/CPU-s':>10}{'vs tokenizer alone':>20}")
        print(f"{'HF encode_batch_fast alone (1 thread)':<38}{base:>8.2f}{base:>10.2f}{1:>19.2f}x")
        for workers in runs:
            r = results[f"prepare_w{workers}"]
            print(f"{f'prepare, {workers} worker(s)':<38}{r['mb_per_s']:>8.2f}{r['mb_per_cpu_s']:>10.2f}"
                  f"{r['mb_per_s'] / base:>19.2f}x")
        nano = results["nanogpt_tokens_per_s"]
        print(f"\nloader: batches of {BATCH} x {SEQ}, one process")
        print(f"{'run':<34}{'M tokens/s':>11}{'vs nanoGPT':>12}")
        for name, key in (("nanoGPT get_batch (random windows)", "nanogpt_tokens_per_s"),
                          ("gorilla_dist loader", "loader_tokens_per_s"),
                          ("gorilla_dist loader, reset_at_eod", "loader_reset_tokens_per_s"),
                          ("packed instruction examples", "loader_packed_tokens_per_s")):
            print(f"{name:<34}{results[key] / 1e6:>11.1f}{results[key] / nano:>11.2f}x")
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
