"""Char- and byte-level tokenization of one text file into train/val token files.

`prepare_text` writes `train.bin` / `val.bin` (uint16 tokens), `tokenizer.json` and `meta.json` into
an output directory, atomically (a temporary directory renamed into place), and reuses them when the
source file and tokenizer are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from gorilla_dist.errors import DataError

BUNDLED = "tinyshakespeare.txt"


def bundled_corpus() -> Path:
    return Path(str(resources.files("gorilla_dist.data").joinpath(BUNDLED)))


class CharTokenizer:
    """One token per distinct character of the corpus (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise DataError(f"characters {unknown[:10]!r} are not in this char vocabulary "
                            f"({self.vocab_size} characters from the training corpus)")
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes, 256 symbols."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}


def tokenizer_from_json(spec: dict):
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "byte":
        return ByteTokenizer()
    raise DataError(f"unknown tokenizer kind {spec['kind']!r} in tokenizer.json")


def load_tokenizer(data_dir: str | os.PathLike):
    path = Path(data_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; was this run directory trained?")
    return tokenizer_from_json(json.loads(path.read_text()))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data.path={str(path)!r} is empty: nothing to train on")
    if b"\x00" in raw[:1 << 20]:
        raise DataError(f"data.path={str(path)!r} contains NUL bytes: it looks binary, expected a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data.path={str(path)!r} is not UTF-8 text: undecodable byte at offset {err.start}") from None


def _fingerprint(path: Path, tokenizer: str, val_fraction: float) -> dict:
    """What the token files are a function of: the source's content (not its path or mtime, so a
    fresh clone or a copied corpus reuses them), the tokenizer and the split."""
    return {"source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tokenizer": tokenizer,
            "val_fraction": val_fraction}


def prepare_text(path: str | None, tokenizer: str, out_dir: str | os.PathLike, *, val_fraction: float,
                 min_tokens: int) -> dict:
    """Tokenize `path` (None: the bundled corpus) into out_dir; returns meta.json's content."""
    src = bundled_corpus() if path is None else Path(path)
    out = Path(out_dir)
    if not src.is_file():
        raise DataError(f"data.path={str(src)!r}: no such file")
    fingerprint = _fingerprint(src, tokenizer, val_fraction)
    meta_path = out / "meta.json"
    if out.exists() and not meta_path.is_file():  # our writes are atomic: a complete dir has meta.json
        raise DataError(f"{out} exists but was not prepared by gorilla_dist (no meta.json); move it away")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            return meta
        # This run's checkpoints were trained on the existing token files: never replace them.
        old = meta.get("fingerprint", {})
        if old.get("tokenizer") != tokenizer:
            raise DataError(f"{out} holds data tokenized with {old.get('tokenizer')!r}, not "
                            f"data.tokenizer={tokenizer!r}; use a new run.dir for a different tokenizer")
        raise DataError(f"{out} was prepared from different data (source sha256 {old.get('source_sha256')}, "
                        f"val_fraction {old.get('val_fraction')}) than data.path={str(src)!r} with "
                        f"data.val_fraction={val_fraction}; use a new run.dir for new data")

    text = _read_text(src)
    tok = CharTokenizer("".join(sorted(set(text)))) if tokenizer == "char" else ByteTokenizer()
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    n_val = int(len(ids) * val_fraction)
    train, val = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    for name, split in (("train", train), ("val", val)):
        if len(split) < min_tokens:
            raise DataError(f"data.path={str(src)!r}: the {name} split has {len(split)} tokens, fewer than "
                            f"model.seq_length + 2 = {min_tokens}; use a larger corpus or adjust data.val_fraction")
    meta = {"fingerprint": fingerprint, "vocab_size": tok.vocab_size, "dtype": "uint16",
            "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    (tmp / "tokenizer.json").write_text(json.dumps(tok.to_json()))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return meta
