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
from gorilla_dist.data.instruct import BadRow, Example, Template, label_names, rendered_text
from gorilla_dist.data.readers import BadRecord, DocumentReader, expand_inputs
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
    special_tokens: str = "none"
    """none | objectives: reserve the pretraining objectives' special tokens (UL2 mode tokens, a separator,
    sentinels: data/tokenizer.py OBJECTIVE_TOKENS) in the vocabulary, for train.objectives that need them.
    A tokenizer.json that already has them keeps them (and their ids)."""
    workers: int = 0
    """Tokenizer processes; 0 = all cores."""
    progress: bool = True
    """Show a progress bar (documents, MB/s, ETA) and a summary."""
    format: str = "text"
    """text (documents to pretrain on) | instruction (.jsonl / .parquet rows of instruction/input/output or
    messages, rendered by `template`, with a per-token loss mask stored beside the shards: see
    gorilla_dist/data/instruct.py)."""
    template: str | None = None
    """format=instruction: a YAML / JSON file replacing keys of the default template."""
    train_on_inputs: bool = False
    """format=instruction: put the prompts in the loss too (default: outputs / assistant turns only)."""
    on_bad_row: str = "fail"
    """format=instruction: a row that cannot be used (missing or empty output, wrong types, not JSON,
    characters the tokenizer lacks): fail (naming file and line) | skip (and count it)."""


INSTRUCTION_ARGS = ("format", "template", "train_on_inputs", "on_bad_row")
FORMATS = ("text", "instruction")
ON_BAD_ROW = ("fail", "skip")
SPECIAL_TOKENS = ("none", "objectives")


def _fingerprint(args: PrepareArgs, files: list[Path]) -> dict:
    """What the output is a function of (not workers or progress); compared on re-runs."""
    keep = {k: v for k, v in asdict(args).items() if k not in ("input", "output", "workers", "progress")}
    if args.format == "text":  # text datasets keep the fingerprint they had before instruction data existed
        for k in INSTRUCTION_ARGS:
            keep.pop(k)
    if args.special_tokens == "none":  # (likewise for data without special tokens)
        keep.pop("special_tokens")
    elif args.template is not None:
        keep["template"] = [args.template, sha256_file(Path(args.template))]
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


def _init_worker(tok_json: dict, dtype: str, on_bad_row: str = "fail") -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the pool is the parallelism
    _WORKER["tok"] = toks.tokenizer_from_json(tok_json)
    _WORKER["dtype"] = DTYPES[dtype]
    _WORKER["on_bad_row"] = on_bad_row


def _encode_examples(docs: list[Example], where: list[str]):
    """Instruction examples → (tokens, lengths, loss mask (uint8) for each token, rows skipped, labels):
    labels: each kept example's (label or None, index of its last prompt token). Each part is tokenized
    alone, so the mask follows the parts exactly; EOD parts are <eod>."""
    tok, ids, masks, kept, labels, skipped = _WORKER["tok"], [], [], [], [], 0
    for example, at in zip(docs, where):
        try:
            pieces = [np.array([tok.eod]) if text is None else tok.encode(text) for text, _ in example.parts]
        except DataError as err:  # e.g. a character a char vocabulary lacks
            if _WORKER["on_bad_row"] == "skip":
                skipped += 1
                continue
            raise DataError(f"{at}: {err}; to skip such rows, prepare with on_bad_row=skip") from None
        ids.append(np.concatenate(pieces))
        kept.append(at)
        masks.append(np.concatenate([np.full(len(x), target, dtype=np.uint8)
                                     for x, (_, target) in zip(pieces, example.parts)]))
        labels.append((example.label, sum(len(x) for x in pieces[:example.prompt_parts]) - 1))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    out = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    return _as_dtype(out, lengths, kept), lengths, (np.concatenate(masks) if masks else np.empty(0, np.uint8)), \
        skipped, labels


def _encode_chunk(texts: list, where: list[str]):
    """Documents → (their tokens concatenated, each followed by <eod>, as the shard dtype; lengths; None;
    0; None), or instruction examples → _encode_examples."""
    if texts and isinstance(texts[0], Example):
        return _encode_examples(texts, where)
    tok = _WORKER["tok"]
    ids = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths)
    out[ends - 1] = tok.eod
    for x, end in zip(ids, ends):
        out[end - 1 - len(x):end - 1] = x
    return _as_dtype(out, lengths, where), lengths, None, 0, None


def _as_dtype(out: np.ndarray, lengths: np.ndarray, where: list[str]) -> np.ndarray:
    dtype = _WORKER["dtype"]
    ends = np.cumsum(lengths)
    limit = np.iinfo(dtype).max
    if len(out) and out.max() > limit:
        bad = int(np.searchsorted(ends, int(np.argmax(out > limit)), side="right"))
        raise DataError(f"{where[bad]}: token id {int(out.max())} does not fit dtype {np.dtype(dtype).name} "
                        f"(max {limit}); use dtype=uint32 or dtype=auto")
    return out.astype(dtype)


def _chunks(docs, reader: DocumentReader):
    """Group documents into ~CHUNK_BYTES tasks; each carries where its documents came from (for errors).
    docs: texts, or (Example, where) of instruction examples."""
    texts, where, size = [], [], 0
    for doc in docs:
        if isinstance(doc, tuple):  # an instruction example
            doc, at = doc
            texts.append(doc)
            where.append(at)
            size += len(rendered_text(doc))
        else:
            texts.append(doc)
            where.append(str(reader.current))
            size += len(doc)
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

    def __init__(self, out: Path, *, shard_tokens: int, dtype: str, fingerprint: dict, resume: dict,
                 masks: bool = False):
        self.out, self.shard_tokens, self.dtype, self.fingerprint = out, shard_tokens, dtype, fingerprint
        self.buffer = np.empty(shard_tokens, dtype=DTYPES[dtype])
        self.mask_buffer = np.empty(shard_tokens, dtype=np.uint8) if masks else None  # instruction data
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
        self.bad_rows = 0  # instruction rows skipped under on_bad_row=skip
        self.labels: list[tuple] = []  # instruction examples: (label or None, last prompt token) of each

    def add(self, tokens: np.ndarray, lengths: np.ndarray, masks: np.ndarray | None = None) -> None:
        if not len(lengths):
            return
        masks = tokens if masks is None else masks  # (ignored without a mask buffer)
        ends = self.cursor + np.cumsum(lengths)
        self.cursor = int(ends[-1])
        self.documents += len(lengths)
        self.index.write(ends.tobytes())
        self.pending_ends.extend(ends.tolist())
        if self.skip:
            dropped = min(self.skip, len(tokens))
            tokens, masks, self.skip = tokens[dropped:], masks[dropped:], self.skip - dropped
        while len(tokens):
            n = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            if self.mask_buffer is not None:
                self.mask_buffer[self.filled:self.filled + n] = masks[:n]
            self.filled += n
            tokens, masks = tokens[n:], masks[n:]
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
        shard = {"file": name, "tokens": int(self.filled), "sha256": hashlib.sha256(data).hexdigest()}
        if self.mask_buffer is not None:  # the loss mask of the same tokens, one byte each
            mask, mask_name = self.mask_buffer[:self.filled], f"mask_{len(self.shards):05d}.bin"
            mask.tofile(self.out / (mask_name + ".tmp"))
            os.replace(self.out / (mask_name + ".tmp"), self.out / mask_name)
            shard["mask"] = {"file": mask_name, "sha256": hashlib.sha256(mask).hexdigest()}
        self.shards.append(shard)  # (the digests hash the buffers: no copy)
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

LABELS = "labels.bin"


def _write_labels(out: Path, labels: list[tuple]) -> dict:
    """Labelled examples: labels.bin, int32 (documents, 2): each example's class id and the index in the
    example of its last prompt token (what the classification head reads); meta.json's `labels` entry
    (the class names in id order). {} when the examples have no labels."""
    if not labels or labels[0][0] is None:
        return {}
    names = label_names([label for label, _ in labels])
    ids = {name: i for i, name in enumerate(names)}
    table = np.array([(ids[str(label)], pool) for label, pool in labels], dtype=np.int32).reshape(-1, 2)
    table.tofile(out / (LABELS + ".tmp"))
    os.replace(out / (LABELS + ".tmp"), out / LABELS)
    return {"labels": {"names": names, "file": LABELS, "sha256": sha256_file(out / LABELS)}}


def _reader(args: PrepareArgs, files: list[Path]) -> DocumentReader:
    return DocumentReader(files, field=args.field, sample_by=args.sample_by, on_decode_error=args.on_decode_error,
                          records=args.format == "instruction")


class _Examples:
    """Instruction rows → (Example, where), rendered by the template; bad rows raise or are counted.
    Either every row has a label or none has (the first row decides)."""

    def __init__(self, args: PrepareArgs, reader: DocumentReader):
        self.reader, self.template = reader, Template.load(args.template)
        self.train_on_inputs, self.policy = args.train_on_inputs, args.on_bad_row
        self.skipped = 0
        self.first: tuple[bool, str] | None = None  # (labelled, where) of the first usable row

    def __iter__(self):
        for row, where in self.reader:
            try:
                if isinstance(row, BadRecord):
                    raise BadRow(row)
                example = self.template.render(row, where, train_on_inputs=self.train_on_inputs)
                labelled = example.label is not None
                self.first = self.first or (labelled, where)
                if labelled != self.first[0]:
                    with_label, without = (where, self.first[1]) if labelled else (self.first[1], where)
                    raise DataError(f"{with_label} has a 'label' field and {without} has none; either every row "
                                    "of a dataset has a label (for finetune.head=classification) or none has")
                yield example, where
            except BadRow as err:
                if self.policy == "fail":
                    raise BadRow(f"{err}; to skip such rows, prepare with on_bad_row=skip") from None
                self.skipped += 1


def _documents(args: PrepareArgs, files: list[Path]):
    """What gets tokenized: the reader's texts, or rendered instruction examples (parts, where)."""
    reader = _reader(args, files)
    return (reader, _Examples(args, reader) if args.format == "instruction" else reader)


def _texts(args: PrepareArgs, files: list[Path]):
    """Plain text of every document (instruction examples rendered), to build a vocabulary from."""
    for doc in _documents(args, files)[1]:
        yield rendered_text(doc[0].parts) if isinstance(doc, tuple) else doc


def _build_tokenizer(args: PrepareArgs, files: list[Path], say):
    spec = args.tokenizer
    if spec == "byte":
        return toks.ByteTokenizer()
    if spec == "char":  # the vocabulary is the corpus's characters: one streaming pass to collect them
        chars: set[str] = set()
        for text in _texts(args, files):
            chars.update(text)
        return toks.CharTokenizer("".join(sorted(chars)))
    if spec.startswith("bpe:"):
        vocab = toks.parse_bpe_spec(spec)
        budget = int(args.bpe_train_mb * 1e6)

        def sample():
            seen = 0
            for text in _texts(args, files):
                yield text
                seen += len(text)
                if seen >= budget:
                    return

        say(f"[prepare] training a byte-level BPE of {vocab} ids on up to {args.bpe_train_mb:g} MB", flush=True)
        tok = toks.train_bpe(sample(), vocab, args.eod_token or "<|endoftext|>")
        if tok.vocab_size < vocab:  # the trainer stops when no pair is left to merge
            print(f"[prepare] note: the BPE has {tok.vocab_size:,} ids, not {vocab:,}: the training text has no more "
                "pairs to merge (a larger corpus, or a smaller vocabulary, fits the request)", flush=True)
        return tok
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
    for key, valid in (("format", FORMATS), ("on_bad_row", ON_BAD_ROW), ("special_tokens", SPECIAL_TOKENS)):
        if getattr(args, key) not in valid:
            raise DataError(f"{key}={getattr(args, key)!r}: expected one of {list(valid)}")
    if args.format == "text" and (args.template is not None or args.train_on_inputs):
        raise DataError("template= and train_on_inputs= apply to format=instruction only")
    template = Template.load(args.template) if args.format == "instruction" else None  # refused before any output
    files = expand_inputs(list(args.input))
    out = Path(args.output)
    fingerprint = _fingerprint(args, files)
    done, resume = _check_output(out, fingerprint, new_output_hint)
    if done:
        say(f"[prepare] {out} is already prepared with these arguments ({done['tokens']:,} tokens); "
            "nothing to do", flush=True)
        return done
    if resume and args.format == "instruction":  # rows skipped as bad make row and document counts differ
        say(f"[prepare] {out}: restarting the interrupted preparation (instruction data is prepared in one go)",
            flush=True)
        for path in out.iterdir():
            path.unlink()
        resume = None
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
            **({"examples": {"train_on_inputs": args.train_on_inputs, "bad_rows_skipped": writer.bad_rows,
                             "template": template.parts, **writer.label_meta}} if template is not None else {}),
            "prepare": {"fingerprint": fingerprint, "input": list(args.input), "seconds": round(seconds, 2)}}
    _write_json(out / "meta.json", meta)
    (out / "progress.json").unlink(missing_ok=True)
    mb = reader.total_bytes / 1e6
    say(f"[prepare] {out}: {writer.documents:,} documents, {writer.cursor:,} tokens in {len(writer.shards)} "
        f"shards ({writer.dtype}); {mb:.1f} MB in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s, {workers} workers)"
        + (f"; skipped {reader.skipped} undecodable documents" if reader.skipped else "")
        + (f"; skipped {writer.bad_rows} bad rows" if writer.bad_rows else ""), flush=True)
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
        if args.special_tokens == "objectives" and tok.specials != toks.OBJECTIVE_TOKENS:
            tok = tok.with_specials(toks.OBJECTIVE_TOKENS)
        toks.save_tokenizer(tok, out / "tokenizer.json")
    dtype = args.dtype if args.dtype != "auto" else ("uint16" if tok.vocab_size <= 1 << 16 else "uint32")

    reader, docs = _documents(args, files)
    writer = ShardWriter(out, shard_tokens=args.shard_tokens, dtype=dtype, fingerprint=fingerprint, resume=resume,
                         masks=args.format == "instruction")
    workers = args.workers or os.cpu_count() or 1
    start = time.perf_counter()
    try:
        _tokenize(reader, docs, writer, tok, dtype, workers, progress=args.progress, skip_docs=resume["documents"],
                  on_bad_row=args.on_bad_row)
    except BaseException:
        writer.index.close()
        raise
    writer.finish()
    writer.bad_rows += getattr(docs, "skipped", 0)
    writer.label_meta = _write_labels(out, writer.labels)
    if writer.documents == 0:
        why = [f"{n} {what}" for n, what in ((reader.skipped, "undecodable documents"),
                                             (writer.bad_rows, "bad rows")) if n]
        raise DataError(f"input={list(args.input)}: no documents found (every file is empty"
                        f"{', or all were skipped: ' + ', '.join(why) if why else ''})")
    return tok, reader, writer, workers, time.perf_counter() - start


def _tokenize(reader: DocumentReader, docs, writer: ShardWriter, tok, dtype: str, workers: int, *, progress: bool,
              skip_docs: int, on_bad_row: str) -> None:
    from tqdm import tqdm

    bar = tqdm(total=reader.total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    docs = itertools.islice(docs, skip_docs, None)  # resuming: read past what the shards already hold

    def written(result) -> None:
        tokens, lengths, masks, skipped, labels = result
        writer.add(tokens, lengths, masks)
        writer.bad_rows += skipped
        writer.labels += labels or []
        bar.update(reader.bytes_done - bar.n)
        bar.set_postfix(docs=f"{writer.documents:,}", refresh=False)

    try:  # the bar ends its line even when a document fails, so the error starts on its own line
        if workers == 1:
            _init_worker(tok.to_json(), dtype, on_bad_row)
            for texts, where in _chunks(docs, reader):
                written(_encode_chunk(texts, where))
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, (tok.to_json(), dtype, on_bad_row)) as pool:
                pending: deque = deque()
                for texts, where in _chunks(docs, reader):
                    pending.append(pool.apply_async(_encode_chunk, (texts, where)))
                    if len(pending) >= 2 * workers:  # bounded: never more than this many chunks in memory
                        written(pending.popleft().get())
                while pending:
                    written(pending.popleft().get())
    finally:
        bar.close()
