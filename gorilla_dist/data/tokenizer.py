"""Tokenizers: char, byte, a Hugging Face `tokenizer.json`, or a byte-level BPE trained on the input.

Every tokenizer has an end-of-document token (`eod`) that the prepare tool appends to each document.
They are saved as one JSON file, `tokenizer.json`, with a `kind` field:
  {"kind": "char", "chars": "..."}     one id per character of the corpus, then <eod>
  {"kind": "byte"}                     the 256 UTF-8 byte values, then <eod> (257 ids)
  {"kind": "hf", "eod": "<|endoftext|>", "hf": {...}}   a Hugging Face tokenizers JSON, embedded

`encode` returns a numpy array of ids without the eod token; the prepare tool appends it.

Special tokens (`prepare ... special_tokens=objectives`): the pretraining objectives' mode tokens,
separator and sentinels (OBJECTIVE_TOKENS, in that order) get ids of their own, which no text encodes to
for char and byte tokenizers. char / byte: the ids after <eod>, in order (the file adds
"specials": [...]); hf: added to the Hugging Face tokenizer as special tokens (its next free ids, in
order). A tokenizer.json that has them keeps them: a second dataset prepared with it shares the ids.
`special_id(name)` finds one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gorilla_dist.errors import DataError
from gorilla_dist.files import write_text_atomic

EOD_TEXT = "\n"  # what char/byte tokenizers decode <eod> as: the separator a document boundary replaced
HF_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
N_SENTINELS = 64
OBJECTIVE_TOKENS = ("<|mode:R|>", "<|mode:X|>", "<|mode:S|>", "<|sep|>",
                    *(f"<|sentinel:{i}|>" for i in range(N_SENTINELS)))
"""The special tokens of the pretraining objectives (gorilla_dist/objectives): UL2's three denoiser modes,
a separator, and the sentinels that stand for corrupted spans."""
SPEC_HELP = ("valid tokenizer specs: char | byte | bpe:<vocab_size> (train a byte-level BPE on the input) | "
             "the path of a Hugging Face tokenizer.json or of a directory containing one")


class _Specials:
    """Special tokens after <eod> (char and byte tokenizers)."""

    specials: tuple[str, ...] = ()

    def special_id(self, name: str) -> int:
        if name not in self.specials:
            raise DataError(f"the tokenizer has no special token {name!r}; prepare the data with "
                            "special_tokens=objectives")
        return self.eod + 1 + self.specials.index(name)

    def _special_text(self, i: int) -> str | None:
        k = i - self.eod - 1
        return self.specials[k] if 0 <= k < len(self.specials) else None


class CharTokenizer(_Specials):
    """One id per distinct character of the corpus (nanoGPT's shakespeare_char), then <eod>."""

    kind = "char"

    def __init__(self, chars: str, specials: tuple[str, ...] = ()):
        self.chars = chars
        self.eod = len(chars)
        self.specials = tuple(specials)
        self.vocab_size = len(chars) + 1 + len(self.specials)
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._lut = np.full(int(codes.max(initial=0)) + 1, -1, dtype=np.int64)  # code point -> id
        self._lut[codes] = np.arange(len(chars))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.full(len(codes), -1, dtype=np.int64)
        known = codes < len(self._lut)
        ids[known] = self._lut[codes[known]]
        if (ids < 0).any():
            unknown = sorted({chr(c) for c in codes[ids < 0].tolist()})
            raise DataError(f"characters {unknown[:10]!r} are not in this char vocabulary "
                            f"({len(self.chars)} characters from the training corpus)")
        return ids

    def decode(self, ids) -> str:
        return "".join(EOD_TEXT if i == self.eod else self._special_text(i) or self.chars[i] for i in ids)

    def with_specials(self, names) -> CharTokenizer:
        return CharTokenizer(self.chars, tuple(names))

    def to_json(self) -> dict:
        return {"kind": "char", "chars": self.chars, **({"specials": list(self.specials)} if self.specials else {})}


class ByteTokenizer(_Specials):
    """UTF-8 bytes (256 ids), then <eod>."""

    kind = "byte"
    eod = 256

    def __init__(self, specials: tuple[str, ...] = ()):
        self.specials = tuple(specials)
        self.vocab_size = 257 + len(self.specials)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            out += EOD_TEXT.encode() if i == self.eod else (self._special_text(i) or "").encode() or bytes((i,))
        return out.decode("utf-8", errors="replace")

    def with_specials(self, names) -> ByteTokenizer:
        return ByteTokenizer(tuple(names))

    def to_json(self) -> dict:
        return {"kind": "byte", **({"specials": list(self.specials)} if self.specials else {})}


# GPT-2's pre-tokenizer pattern, as Hugging Face's ByteLevel(use_regex=True) applies it.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (what ByteLevel uses)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in keep)
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class _CachedByteLevelBPE:
    """The same ids as a plain byte-level BPE `Tokenizer.encode`, about twice as fast for corpora.

    Hugging Face's encode spends most of its time building Encoding objects (offsets, words) rather
    than merging; here each pre-tokenized word is merged once by the tokenizer's own BPE model and
    then looked up. Only used for the exact pipeline it reproduces (no normalizer, GPT-2 ByteLevel
    pre-tokenizer, BPE model); tests compare it with `Tokenizer.encode` on real text."""

    MAX_WORDS = 1 << 20  # bound the cache: a web corpus has many millions of distinct words

    def __init__(self, tok, spec: dict):
        import regex

        self.model, self.split = tok.model, regex.compile(GPT2_SPLIT).findall
        self.table = str.maketrans(bytes_to_unicode())
        self.specials = [t["content"] for t in spec.get("added_tokens", [])]
        self.cache: dict[str, list[int]] = {}

    @staticmethod
    def applies(spec: dict) -> bool:
        pre = spec.get("pre_tokenizer") or {}
        return (spec.get("normalizer") is None and spec.get("model", {}).get("type") == "BPE"
                and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space", False) and not spec.get("model", {}).get("dropout"))

    def encode(self, text: str) -> list[int] | None:
        """The ids, or None when the text contains a special token's text (Hugging Face's path then)."""
        if any(t in text for t in self.specials):
            return None
        out, cache = [], self.cache
        for word in self.split(text):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= self.MAX_WORDS:
                    cache.clear()
                mapped = word.encode("utf-8").decode("latin-1").translate(self.table)
                ids = cache[word] = [t.id for t in self.model.tokenize(mapped)]
            out.extend(ids)
        return out


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`; <eod> is one of its special tokens."""

    kind = "hf"

    def __init__(self, hf_json: str, eod_token: str | None = None, *, source: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        self._json = hf_json
        self.tok = Tokenizer.from_str(hf_json)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        if eod_token is None:
            eod_token = next((t for t in HF_EOD_CANDIDATES if t in vocab), None)
            if eod_token is None:
                raise DataError(f"{source}: no end-of-document token found (looked for {list(HF_EOD_CANDIDATES)}); "
                                "name it with eod_token=<token>")
        if eod_token not in vocab:
            raise DataError(f"{source}: eod_token={eod_token!r} is not in its vocabulary")
        self.eod_token, self.eod = eod_token, vocab[eod_token]
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        spec = json.loads(hf_json)
        self._fast = _CachedByteLevelBPE(self.tok, spec) if _CachedByteLevelBPE.applies(spec) else None
        self.specials = tuple(t for t in OBJECTIVE_TOKENS if t in vocab)

    def special_id(self, name: str) -> int:
        vocab = self.tok.get_vocab(with_added_tokens=True)
        if name not in vocab:
            raise DataError(f"the tokenizer has no special token {name!r}; prepare the data with "
                            "special_tokens=objectives")
        return vocab[name]

    def with_specials(self, names) -> HFTokenizer:
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(self._json)
        tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        return HFTokenizer(tok.to_str(), self.eod_token)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self._fast is not None:
            return [np.asarray(ids if (ids := self._fast.encode(t)) is not None else self.encode(t), dtype=np.int64)
                    for t in texts]
        return [np.asarray(e.ids, dtype=np.int64)
                for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"kind": "hf", "eod": self.eod_token, "hf": json.loads(self._json)}


def tokenizer_from_json(spec: dict, *, source: str = "tokenizer.json"):
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"], tuple(spec.get("specials", ())))
    if kind == "byte":
        return ByteTokenizer(tuple(spec.get("specials", ())))
    if kind == "hf":
        return HFTokenizer(json.dumps(spec["hf"]), spec["eod"], source=source)
    raise DataError(f"{source}: unknown tokenizer kind {kind!r}; expected char, byte or hf")


def load_tokenizer(path: str | os.PathLike):
    """Load our tokenizer.json (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; was this run directory or dataset prepared?")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a tokenizer JSON file ({err})") from None
    return tokenizer_from_json(spec, source=str(path))


def save_tokenizer(tok, path: str | os.PathLike) -> None:
    write_text_atomic(path, json.dumps(tok.to_json(), ensure_ascii=False))


def load_hf_tokenizer(spec: str, eod_token: str | None = None) -> HFTokenizer:
    """A user's Hugging Face tokenizer: a tokenizer.json file or a directory with one."""
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer={spec!r}: no such file or directory with a tokenizer.json; {SPEC_HELP}")
    text = path.read_text()
    try:
        if json.loads(text).get("kind") is not None:  # one of ours (e.g. a prepared dataset's tokenizer.json)
            return load_tokenizer(path)
        return HFTokenizer(text, eod_token, source=str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
        if isinstance(err, DataError):
            raise
        raise DataError(f"tokenizer={spec!r}: not a Hugging Face tokenizer.json ({err})") from None


def parse_bpe_spec(spec: str) -> int:
    try:
        vocab = int(spec.split(":", 1)[1])
    except ValueError:
        raise DataError(f"tokenizer={spec!r}: expected bpe:<vocab_size>, e.g. bpe:32000") from None
    if not 257 <= vocab <= 1 << 24:
        raise DataError(f"tokenizer={spec!r}: a byte-level BPE vocabulary needs 257..{1 << 24} ids")
    return vocab


def train_bpe(texts, vocab_size: int, eod_token: str = "<|endoftext|>") -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization) with Hugging Face tokenizers on an
    iterator of documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok.to_str(), eod_token, source=f"bpe:{vocab_size}")


def same_tokenizer(a: Path, b: Path) -> bool:
    """Two tokenizer.json files describe the same token ids (our files are written canonically, so byte
    equality is the test)."""
    return Path(a).read_bytes() == Path(b).read_bytes()
