"""Prepare a corpus once: text files → tokenized shards + document index + metadata.

    python -m gorilla_dist.data.prepare input=corpus/ input=extra.jsonl.gz output=data/web tokenizer=bpe:32000

Output directory:
    tokenizer.json        the tokenizer (ours: char | byte | hf with an embedded Hugging Face JSON)
    shard_00000.bin ...   the token stream cut into files of `shard_tokens` tokens (uint16, or uint32 when
                          the vocabulary needs it); every document ends with the tokenizer's <eod>
    index.bin             int64 document offsets into the stream: document i is [index[i], index[i+1])
    meta.json             written last (its presence means complete): tokenizer, vocab size, dtype, token and
                          document counts, sha256 of every file, the prepare arguments
    progress.json         only while preparing; lets an interrupted run resume at the last complete shard

Tokenization runs in a pool of `workers` processes fed a bounded number of chunks, so memory stays
bounded whatever the input size. Re-running with the same arguments resumes (or says it is done);
with different ones it refuses, so two tokenizers are never mixed in one directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gorilla_dist.data import tokenizer as toks
from gorilla_dist.data.format import DTYPES, FORMAT
from gorilla_dist.data.readers import DocumentReader, expand_inputs
from gorilla_dist.errors import DataError
from gorilla_dist.files import sha256_file, write_text_atomic

CHUNK_BYTES = 1 << 20  # text per task sent to a tokenizer process


@dataclass
class PrepareArgs:
    input: list[str] = field(default_factory=list)
    """Files, directories or globs of .txt / .jsonl / .jsonl.gz / .parquet (repeat or comma-separate)."""
    output: str | None = None
    """The dataset directory to write."""
    tokenizer: str = "byte"
    """char | byte | bpe:<vocab_size> | path of a Hugging Face tokenizer.json (or its directory)."""
    field: str = "text"
    """jsonl / parquet: the field holding the text."""
    sample_by: str = "document"
    """.txt: what one document is: document (the file) | paragraph (blank-line separated) | line."""
    on_decode_error: str = "fail"
    """A document that is not UTF-8 text: fail (error naming the file) | skip (and count it)."""
    shard_tokens: int = 1 << 27
    """Tokens per shard file (the last one is shorter)."""
    dtype: str = "auto"
    """auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32."""
    eod_token: str | None = None
    """Hugging Face tokenizers: the end-of-document token (default: a well-known one it has)."""
    bpe_train_mb: float = 512.0
    """bpe:<n>: train on at most this many MB of the input's first documents."""
    file_identity: str = "stat"
    """How a re-run recognises unchanged inputs: stat (path, size, mtime) | sha256 (content: a moved
    or copied corpus is recognised; reads every file once more)."""
    workers: int = 0
    """Tokenizer processes; 0 = all cores."""
    progress: bool = True
    """Show a progress bar (documents, MB/s, ETA) and a summary."""


def _fingerprint(args: PrepareArgs, files: list[Path]) -> dict:
    """What the output is a function of (not workers or progress); compared on re-runs."""
    keep = {k: v for k, v in asdict(args).items() if k not in ("input", "output", "workers", "progress")}
    if args.file_identity == "sha256":
        keep["files"] = [[p.stat().st_size, sha256_file(p)] for p in files]
    else:
        keep["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return keep


def _difference(old: dict, new: dict) -> str:
    keys = [k for k in new if old.get(k) != new[k]]
    if keys == ["files"]:
        return "different input files (or files changed since)"
    return ", ".join(f"{k}={old.get(k)!r} there, {new[k]!r} now" for k in keys if k != "files")


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


# -- tokenizer processes ------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tok_json: dict, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the pool is the parallelism
    _WORKER["tok"] = toks.tokenizer_from_json(tok_json)
    _WORKER["dtype"] = DTYPES[dtype]


def _encode_chunk(texts: list[str], where: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents → (their tokens concatenated, each followed by <eod>, as the shard dtype; lengths)."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    ids = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    out[ends - 1] = tok.eod
    for x, end in zip(ids, ends):
        out[end - 1 - len(x):end - 1] = x
    limit = np.iinfo(dtype).max
    if len(out) and out.max() > limit:
        bad = int(np.searchsorted(ends, int(np.argmax(out > limit)), side="right"))
        raise DataError(f"{where[bad]}: token id {int(out.max())} does not fit dtype {np.dtype(dtype).name} "
                        f"(max {limit}); use dtype=uint32 or dtype=auto")
    return out.astype(dtype), lengths


def _chunks(docs, reader: DocumentReader):
    """Group documents into ~CHUNK_BYTES tasks; each carries where its documents came from (for errors)."""
    texts, where, size = [], [], 0
    for text in docs:
        texts.append(text)
        where.append(str(reader.current))
        size += len(text)
        if size >= CHUNK_BYTES:
            yield texts, where
            texts, where, size = [], [], 0
    if texts:
        yield texts, where


# -- the shard writer -------------------------------------------------------------------------------

class ShardWriter:
    """Appends documents' tokens to fixed-size shard files and their end offsets to index.bin.

    After every full shard it records progress.json: the shards so far and how many documents are
    wholly inside them, so an interrupted run restarts from that document (re-reading, not re-writing,
    what came before)."""

    def __init__(self, out: Path, *, shard_tokens: int, dtype: str, fingerprint: dict, resume: dict):
        self.out, self.shard_tokens, self.dtype, self.fingerprint = out, shard_tokens, dtype, fingerprint
        self.buffer = np.empty(shard_tokens, dtype=DTYPES[dtype])
        self.filled = 0
        self.shards: list[dict] = resume["shards"]
        self.flushed = sum(s["tokens"] for s in self.shards)  # tokens in finished shard files
        self.docs_flushed = resume["documents"]  # documents wholly in finished shards
        index = out / "index.bin"
        if index.is_file():
            with open(index, "r+b") as f:  # drop offsets written after the last finished shard
                f.truncate(8 * (self.docs_flushed + 1))
        else:
            np.zeros(1, dtype=np.int64).tofile(index)
        self.index = open(index, "ab")  # noqa: SIM115 - closed in finish()
        self.cursor = int(np.fromfile(index, dtype=np.int64, offset=8 * self.docs_flushed, count=1)[0])
        self.skip = self.flushed - self.cursor  # tokens of the first document already in a shard
        self.pending_ends: deque[int] = deque()  # ends of documents not yet wholly flushed
        self.documents = self.docs_flushed

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        ends = self.cursor + np.cumsum(lengths)
        self.cursor = int(ends[-1])
        self.documents += len(lengths)
        self.index.write(ends.tobytes())
        self.pending_ends.extend(ends.tolist())
        if self.skip:
            dropped = min(self.skip, len(tokens))
            tokens, self.skip = tokens[dropped:], self.skip - dropped
        while len(tokens):
            n = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        data = self.buffer[:self.filled]
        name = f"shard_{len(self.shards):05d}.bin"
        tmp = self.out / (name + ".tmp")
        data.tofile(tmp)
        os.replace(tmp, self.out / name)
        self.shards.append({"file": name, "tokens": int(self.filled),
                            "sha256": hashlib.sha256(data).hexdigest()})  # hashes the buffer, no copy
        self.flushed += self.filled
        self.filled = 0
        while self.pending_ends and self.pending_ends[0] <= self.flushed:
            self.pending_ends.popleft()
            self.docs_flushed += 1
        self.index.flush()
        os.fsync(self.index.fileno())
        _write_json(self.out / "progress.json", {"fingerprint": self.fingerprint, "shards": self.shards,
                                                 "documents": self.docs_flushed})

    def finish(self) -> None:
        self._flush()
        self.index.close()


# -- prepare ------------------------------------------------------------------------------------------

def _reader(args: PrepareArgs, files: list[Path]) -> DocumentReader:
    return DocumentReader(files, field=args.field, sample_by=args.sample_by, on_decode_error=args.on_decode_error)


def _build_tokenizer(args: PrepareArgs, files: list[Path], say):
    spec = args.tokenizer
    if spec == "byte":
        return toks.ByteTokenizer()
    if spec == "char":  # the vocabulary is the corpus's characters: one streaming pass to collect them
        chars: set[str] = set()
        for text in _reader(args, files):
            chars.update(text)
        return toks.CharTokenizer("".join(sorted(chars)))
    if spec.startswith("bpe:"):
        vocab = toks.parse_bpe_spec(spec)
        reader = _reader(args, files)
        budget = int(args.bpe_train_mb * 1e6)

        def sample():
            seen = 0
            for text in reader:
                yield text
                seen += len(text)
                if seen >= budget:
                    return

        say(f"[prepare] training a byte-level BPE of {vocab} ids on up to {args.bpe_train_mb:g} MB", flush=True)
        return toks.train_bpe(sample(), vocab, args.eod_token or "<|endoftext|>")
    return toks.load_hf_tokenizer(spec, args.eod_token)


NEW_OUTPUT = "choose a new output= (or delete that directory to start over)"


def _check_output(out: Path, fingerprint: dict, hint: str) -> tuple[dict | None, dict | None]:
    """(meta of an identical finished dataset, progress of an identical interrupted one); raises when
    the directory holds anything else."""
    for name, what in (("meta.json", "a dataset prepared"), ("progress.json", "an interrupted preparation")):
        path = out / name
        if path.is_file():
            state = json.loads(path.read_text())
            old = state.get("prepare", state).get("fingerprint", {})
            if old == fingerprint:
                return (state, None) if name == "meta.json" else (None, state)
            raise DataError(f"{out} holds {what} with other arguments ({_difference(old, fingerprint)}); {hint}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output={str(out)!r} exists and is not a gorilla_dist dataset (no meta.json); "
                        "choose a new output=")
    return None, None


def prepare(args: PrepareArgs, *, new_output_hint: str = NEW_OUTPUT) -> dict:
    """Run the preparation described by `args`; returns meta.json's content."""
    say = print if args.progress else (lambda *a, **k: None)
    if not args.output:
        raise DataError("output=<directory> is required")
    if args.dtype not in ("auto", *DTYPES):
        raise DataError(f"dtype={args.dtype!r}: expected auto, uint16 or uint32")
    if args.file_identity not in ("stat", "sha256"):
        raise DataError(f"file_identity={args.file_identity!r}: expected stat or sha256")
    if args.shard_tokens < 1:
        raise DataError(f"shard_tokens={args.shard_tokens}: must be positive")
    files = expand_inputs(list(args.input))
    out = Path(args.output)
    fingerprint = _fingerprint(args, files)
    done, resume = _check_output(out, fingerprint, new_output_hint)
    if done:
        say(f"[prepare] {out} is already prepared with these arguments ({done['tokens']:,} tokens); "
            "nothing to do", flush=True)
        return done
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        tok, reader, writer, workers, seconds = _run(args, files, out, fingerprint, resume, say)
    except DataError:
        if not resume:  # the directory was empty or absent: leave it as it was
            for path in out.iterdir():
                path.unlink()
            if created:
                out.rmdir()
        raise
    meta = {"format": FORMAT, "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eod": tok.eod,
                                            "sha256": sha256_file(out / "tokenizer.json")},
            "dtype": writer.dtype, "tokens": writer.cursor, "documents": writer.documents,
            "shards": writer.shards, "index": {"file": "index.bin", "sha256": sha256_file(out / "index.bin")},
            "skipped_documents": reader.skipped,
            "prepare": {"fingerprint": fingerprint, "input": list(args.input), "seconds": round(seconds, 2)}}
    _write_json(out / "meta.json", meta)
    (out / "progress.json").unlink(missing_ok=True)
    mb = reader.total_bytes / 1e6
    say(f"[prepare] {out}: {writer.documents:,} documents, {writer.cursor:,} tokens in {len(writer.shards)} "
        f"shards ({writer.dtype}); {mb:.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s, {workers} workers)"
        + (f"; skipped {reader.skipped} undecodable documents" if reader.skipped else ""), flush=True)
    return meta


def _run(args: PrepareArgs, files: list[Path], out: Path, fingerprint: dict, resume: dict | None, say):
    """Build (or reload) the tokenizer and tokenize everything into `out`."""
    if resume:
        say(f"[prepare] resuming in {out}: {len(resume['shards'])} shards, {resume['documents']:,} documents done",
            flush=True)
    else:  # from here on a re-run with the same arguments resumes, even if this one is killed
        resume = {"fingerprint": fingerprint, "shards": [], "documents": 0}
        _write_json(out / "progress.json", resume)
    if (out / "tokenizer.json").is_file():
        tok = toks.load_tokenizer(out)
    else:
        tok = _build_tokenizer(args, files, say)
        toks.save_tokenizer(tok, out / "tokenizer.json")
    dtype = args.dtype if args.dtype != "auto" else ("uint16" if tok.vocab_size <= 1 << 16 else "uint32")

    reader = _reader(args, files)
    writer = ShardWriter(out, shard_tokens=args.shard_tokens, dtype=dtype, fingerprint=fingerprint, resume=resume)
    workers = args.workers or os.cpu_count() or 1
    start = time.perf_counter()
    try:
        _tokenize(reader, writer, tok, dtype, workers, progress=args.progress, skip_docs=resume["documents"])
    except BaseException:
        writer.index.close()
        raise
    writer.finish()
    if writer.documents == 0:
        raise DataError(f"input={list(args.input)}: no documents found (every file is empty"
                        f"{f', or {reader.skipped} documents were skipped as undecodable' if reader.skipped else ''})")
    return tok, reader, writer, workers, time.perf_counter() - start


def _tokenize(reader: DocumentReader, writer: ShardWriter, tok, dtype: str, workers: int, *, progress: bool,
              skip_docs: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    docs = itertools.islice(reader, skip_docs, None)  # resuming: read past what the shards already hold

    def written(result) -> None:
        writer.add(*result)
        bar.update(reader.bytes_done - bar.n)
        bar.set_postfix(docs=f"{writer.documents:,}", refresh=False)

    if workers == 1:
        _init_worker(tok.to_json(), dtype)
        for texts, where in _chunks(docs, reader):
            written(_encode_chunk(texts, where))
    else:
        with mp.get_context("spawn").Pool(workers, _init_worker, (tok.to_json(), dtype)) as pool:
            pending: deque = deque()
            for texts, where in _chunks(docs, reader):
                pending.append(pool.apply_async(_encode_chunk, (texts, where)))
                if len(pending) >= 2 * workers:  # bounded: never more than this many chunks in memory
                    written(pending.popleft().get())
            while pending:
                written(pending.popleft().get())
    bar.close()
