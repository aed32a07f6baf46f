"""The prepare tool on real files: every input format, every tokenizer kind, resume, refusals, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from gorilla_dist.data import writer as prep
from gorilla_dist.data.dataset import TokenDataset
from gorilla_dist.data.loader import bundled_corpus
from gorilla_dist.data.writer import PrepareArgs, prepare
from gorilla_dist.data.tokenizer import load_tokenizer
from gorilla_dist.errors import DataError

DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        "naïve café — ünïcödé, 日本語 and emoji 🙂",
        "All:\nSpeak, speak.",
        "x"]


def run(tmp_path, name="out", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return prepare(PrepareArgs(output=str(tmp_path / name), **kw))


def documents(path) -> list[np.ndarray]:
    d = TokenDataset(path)
    return [np.asarray(d.read(int(a), int(b))) for a, b in zip(d.offsets[:-1], d.offsets[1:])]


def write_formats(tmp_path, docs=DOCS) -> dict[str, str]:
    """The same documents as .jsonl, .jsonl.gz and .parquet, the text in field `body`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "docs.jsonl").write_text(lines)
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet", row_group_size=2)
    return {k: str(tmp_path / f"docs.{k}") for k in ("jsonl", "jsonl.gz", "parquet")}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
def test_every_format_gives_the_documents_back(tmp_path, fmt):
    files = write_formats(tmp_path)
    meta = run(tmp_path, input=[files[fmt]], tokenizer="byte", field="body")
    tok = load_tokenizer(tmp_path / "out")
    docs = documents(tmp_path / "out")
    assert meta["documents"] == len(DOCS) and meta["tokens"] == sum(len(d.encode()) + 1 for d in DOCS)
    assert [tok.decode(d[:-1].tolist()) for d in docs] == DOCS
    assert all(d[-1] == tok.eod == 256 for d in docs)
    assert meta["dtype"] == "uint16"


def test_txt_sample_by_line_paragraph_document(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\nfour\n")
    (tmp_path / "b.txt").write_text("five")
    expected = {"line": ["one", "two", "three", "four", "five"],
                "paragraph": ["one\ntwo\n", "three\nfour\n", "five\n"],
                "document": ["one\ntwo\n\n\nthree\nfour\n", "five"]}
    for mode, docs in expected.items():
        run(tmp_path, mode, input=[str(tmp_path)], tokenizer="char", sample_by=mode)
        tok = load_tokenizer(tmp_path / mode)
        assert [tok.decode(d[:-1].tolist()) for d in documents(tmp_path / mode)] == docs, mode


def test_char_tokenizer_on_the_bundled_corpus_round_trips(tmp_path):
    meta = run(tmp_path, input=[str(bundled_corpus())], tokenizer="char", sample_by="paragraph")
    d, tok = TokenDataset(tmp_path / "out"), load_tokenizer(tmp_path / "out")
    assert meta["tokenizer"]["vocab_size"] == 66 and tok.eod == 65  # 65 characters + <eod>
    text = bundled_corpus().read_text()
    # <eod> decodes as the newline of the blank line it replaced (runs of blank lines collapse to one)
    import re
    assert tok.decode(d.read(0, d.tokens).tolist()) == re.sub(r"\n\n+", "\n\n", text) + "\n"


def test_bpe_is_trained_saved_and_round_trips(tmp_path):
    text = bundled_corpus().read_text()[:200_000]
    (tmp_path / "c.txt").write_text(text)
    meta = run(tmp_path, input=[str(tmp_path / "c.txt")], tokenizer="bpe:400", sample_by="paragraph")
    tok = load_tokenizer(tmp_path / "out")
    assert tok.kind == "hf" and tok.vocab_size == meta["tokenizer"]["vocab_size"] <= 400
    assert meta["tokens"] < 0.6 * len(text)  # merges were learned: well under one token per byte
    held_out = "O Romeo, Romeo! wherefore art thou Romeo? naïve 日本 🙂 x²½ 'll  \t\n\n  \n"
    assert tok.decode(tok.encode(held_out).tolist()) == held_out
    # the cached fast path used by prepare gives exactly the library's ids (and defers to it when a
    # document contains a special token's text)
    assert tok._fast is not None
    docs = [held_out, text[:50_000], text[-3000:], "a <|endoftext|> b", ""]
    fast = [x.tolist() for x in tok.encode_batch(docs)]
    assert fast == [e.ids for e in tok.tok.encode_batch(docs, add_special_tokens=False)]
    docs = documents(tmp_path / "out")
    assert all(d[-1] == tok.eod for d in docs) and tok.eod not in np.concatenate([d[:-1] for d in docs])

    # the saved Hugging Face JSON, passed as tokenizer=<file> or <dir>, gives the same tokens
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text(json.dumps(json.loads((tmp_path / "out" / "tokenizer.json").read_text())["hf"]))
    for name, spec in (("as_file", str(hf / "tokenizer.json")), ("as_dir", str(hf))):
        again = run(tmp_path, name, input=[str(tmp_path / "c.txt")], tokenizer=spec, sample_by="paragraph")
        assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in meta["shards"]]


def test_workers_and_shard_size_do_not_change_the_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 5000)  # many tasks in flight
    (tmp_path / "c.txt").write_text(bundled_corpus().read_text()[:100_000])
    one = run(tmp_path, "one", input=[str(tmp_path / "c.txt")], tokenizer="byte", sample_by="paragraph")
    two = run(tmp_path, "two", input=[str(tmp_path / "c.txt")], tokenizer="byte", sample_by="paragraph",
              shard_tokens=7000, workers=2)
    assert len(one["shards"]) == 1 and len(two["shards"]) == -(-one["tokens"] // 7000)
    assert all(s["tokens"] == 7000 for s in two["shards"][:-1])
    for s in two["shards"]:  # the checksums are those of the files
        assert hashlib.sha256((tmp_path / "two" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    a, b = TokenDataset(tmp_path / "one"), TokenDataset(tmp_path / "two")
    assert np.array_equal(a.read(0, a.tokens), b.read(0, b.tokens))
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(b.read(6990, 14010), a.read(6990, 14010))  # reads across shard boundaries


class Interrupt(Exception):
    pass


def test_interrupted_prepare_resumes_to_the_identical_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_BYTES", 3000)
    (tmp_path / "c.txt").write_text(bundled_corpus().read_text()[:60_000])
    args = dict(input=[str(tmp_path / "c.txt")], tokenizer="char", sample_by="paragraph", shard_tokens=5000)
    whole = run(tmp_path, "whole", **args)

    # killed before anything was tokenized (while building the vocabulary): resumable too
    real_build = prep._build_tokenizer
    monkeypatch.setattr(prep, "_build_tokenizer", lambda *a: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        run(tmp_path, "early", **args)
    monkeypatch.setattr(prep, "_build_tokenizer", real_build)
    assert run(tmp_path, "early", **args)["shards"] == whole["shards"]

    real_add = prep.ShardWriter.add
    calls = {"n": 0}

    def add_then_die(self, tokens, lengths, masks=None):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-way: some shards written, a partial one in memory
            raise Interrupt
        real_add(self, tokens, lengths, masks)

    monkeypatch.setattr(prep.ShardWriter, "add", add_then_die)
    with pytest.raises(Interrupt):
        run(tmp_path, "resumed", **args)
    progress = json.loads((tmp_path / "resumed" / "progress.json").read_text())
    assert 0 < len(progress["shards"]) < len(whole["shards"]) and not (tmp_path / "resumed" / "meta.json").exists()
    with pytest.raises(DataError, match="interrupted preparation: re-run"):
        TokenDataset(tmp_path / "resumed")
    with pytest.raises(DataError, match="an interrupted preparation with other arguments"):
        run(tmp_path, "resumed", **{**args, "tokenizer": "byte"})

    monkeypatch.setattr(prep.ShardWriter, "add", real_add)
    resumed = run(tmp_path, "resumed", **args)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in whole["shards"]]
    assert resumed["index"]["sha256"] == whole["index"]["sha256"] and resumed["documents"] == whole["documents"]
    assert not (tmp_path / "resumed" / "progress.json").exists()


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("hello world\n\nhello tokens\n")
    run(tmp_path, input=[str(tmp_path / "c.txt")], tokenizer="char", sample_by="paragraph")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    run(tmp_path, input=[str(tmp_path / "c.txt")], tokenizer="char", sample_by="paragraph", progress=True)
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(DataError, match="a dataset prepared with other arguments \\(tokenizer='char' there, 'byte' now"):
        run(tmp_path, input=[str(tmp_path / "c.txt")], tokenizer="byte", sample_by="paragraph")
    (tmp_path / "c.txt").write_text("changed\n")
    with pytest.raises(DataError, match="different input files"):
        run(tmp_path, input=[str(tmp_path / "c.txt")], tokenizer="char", sample_by="paragraph")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a gorilla_dist dataset"):
        run(tmp_path, "foreign", input=[str(tmp_path / "c.txt")])
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name, content, kw, message", [
    ("empty.txt", b"", {}, "no documents found"),
    ("blank.jsonl", b"\n\n", {}, "no documents found"),
    ("bin.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00binary", {}, "bin.txt: the document contains NUL bytes"),
    ("latin.txt", b"ok line\ncaf\xe9 latin-1\n", {"sample_by": "line"},
     r"latin.txt:2: the document is not valid UTF-8 \(byte 3"),
    ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', {}, r"nofield.jsonl:2: no field 'text' \(found \['body'\]\)"),
    ("notjson.jsonl", b'{"text": "a"}\nnot json\n', {}, "notjson.jsonl:2: not a JSON object"),
    ("nocol.parquet", None, {"field": "content"}, r"nocol.parquet: no column 'content' \(columns: \['body'\]\)"),
    ("trunc.jsonl.gz", None, {}, "trunc.jsonl.gz: truncated or corrupt gzip file"),
    ("notes.csv", b"a,b\n", {}, "notes.csv is not a supported format"),
])
def test_bad_input_gets_one_clear_error_naming_the_file(tmp_path, name, content, kw, message):
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_formats(tmp_path)
        (tmp_path / "docs.parquet").rename(path)
    elif name.endswith(".gz"):
        whole = gzip.compress("".join(json.dumps({"text": f"doc {i * 7919 % 10007}"}) + "\n" for i in range(5000)).encode())
        path.write_bytes(whole[:len(whole) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, input=[str(path)], **kw)
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_the_skip_policy(tmp_path):
    with pytest.raises(DataError, match="input='nope.txt': no such file or directory"):
        run(tmp_path, input=["nope.txt"])
    with pytest.raises(DataError, match=r"input='.*\*.jsonl': the pattern matches no files"):
        run(tmp_path, input=[str(tmp_path / "*.jsonl")])
    (tmp_path / "mixed.txt").write_bytes(b"good one\ncaf\xe9\nbad \x00 nul\ngood two\n")
    meta = run(tmp_path, input=[str(tmp_path / "mixed.txt")], sample_by="line", on_decode_error="skip")
    tok = load_tokenizer(tmp_path / "out")
    assert meta["skipped_documents"] == 2
    assert [tok.decode(d[:-1].tolist()) for d in documents(tmp_path / "out")] == ["good one", "good two"]


def big_vocab_tokenizer(tmp_path):
    """A word-level Hugging Face tokenizer whose ids go past 65535."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "hello": 5, "world": 70_000},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "big.json"))
    return str(tmp_path / "big.json")


def test_token_ids_that_overflow_the_dtype_are_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "hello hello"}\n{"text": "hello world"}\n')
    spec = big_vocab_tokenizer(tmp_path)
    with pytest.raises(DataError, match=r"c.jsonl: token id 70000 does not fit dtype uint16 \(max 65535\)"):
        run(tmp_path, input=[str(tmp_path / "c.jsonl")], tokenizer=spec, dtype="uint16")
    meta = run(tmp_path, "auto", input=[str(tmp_path / "c.jsonl")], tokenizer=spec)
    assert meta["dtype"] == "uint32"
    assert [d.tolist() for d in documents(tmp_path / "auto")] == [[5, 5, 0], [5, 70_000, 0]]


def test_a_truncated_or_corrupted_shard_is_caught_at_open(tmp_path):
    (tmp_path / "c.txt").write_text("some text to tokenize\n\nand a second document\n")
    run(tmp_path, input=[str(tmp_path / "c.txt")], sample_by="paragraph")
    shard = tmp_path / "out" / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard_00000.bin: sha256 does not match meta.json"):
        TokenDataset(tmp_path / "out")
    TokenDataset(tmp_path / "out", verify="size")  # size-only verification does not read the data
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(DataError, match=r"shard_00000.bin: \d+ bytes, meta.json expects \d+: the file is truncated"):
        TokenDataset(tmp_path / "out", verify="size")


def test_cli_exit_codes_and_messages(tmp_path):
    (tmp_path / "c.txt").write_text("a tiny corpus\n")
    cmd = [sys.executable, "-m", "gorilla_dist.data.prepare"]
    bad = subprocess.run(cmd + [f"input={tmp_path}/c.txt", "output=" + str(tmp_path / "o"), "tokenzier=char"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "'tokenzier=char'" in bad.stderr and "tokenizer=" in bad.stderr  # names the key and the valid ones
    missing = subprocess.run(cmd + ["input=/no/such", "output=" + str(tmp_path / "o")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: input='/no/such': no such file or directory"
    ok = subprocess.run(cmd + [f"input={tmp_path}/c.txt", "output=" + str(tmp_path / "o"), "progress=false"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["tokens"] == len("a tiny corpus\n") + 1


def test_an_error_starts_on_its_own_line_after_the_progress_bar(tmp_path):
    """The bar (on stderr, redrawn with carriage returns) ends its line before the error is printed."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 5}\n')
    proc = subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", f"input={bad}", f"output={tmp_path / 'o'}",
                           "workers=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "prepare:" in proc.stderr  # the bar was drawn
    assert proc.stderr.splitlines()[-1] == f"error: {bad}:2: field 'text' is a int, expected a string", proc.stderr


def test_a_bpe_smaller_than_asked_says_so(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    prepare(PrepareArgs(input=[str(corpus)], output=str(tmp_path / "o"), tokenizer="bpe:5000", workers=1,
                        progress=False))
    size = load_tokenizer(tmp_path / "o").vocab_size
    assert size < 5000
    assert f"the BPE has {size:,} ids, not 5,000" in capsys.readouterr().out
