"""A prepared dataset opened for training: shards memory-mapped as one token stream, checked at open.

Text (`Span`): samples are fixed-length windows packed across document boundaries: the split [a, b) of
the stream gives ceil((b - a - 1) / seq) samples, sample j holding tokens a + j*seq ... a + (j+1)*seq
(inclusive, for the shifted targets). The last one is padded with <eod> and its padded targets masked,
so every token of the split is an input exactly once per epoch and nothing is dropped.

Instruction examples (`ExampleSpan`): samples are runs of whole consecutive examples of at most seq + 1
tokens together (next-fit packing in file order; the order of samples is shuffled per epoch like any
other), padded; each token carries its example's number (attention and positions restart there) and
its loss mask. An example never spans two samples. Labelled examples (finetune.head=classification)
also mark their last prompt token with their class id.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

import numpy as np

from gorilla_dist.data.format import DTYPES, FORMAT, VERIFY
from gorilla_dist.errors import DataError
from gorilla_dist.files import sha256_file


class TokenDataset:
    """The token stream and document offsets of one prepared directory.

    verify=checksum re-hashes every file against meta.json (sha256; about 1 s per GB), size only
    compares file sizes (instant; catches truncation, not corruption)."""

    def __init__(self, path: str | Path, *, verify: str = "checksum"):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            hint = (" (an interrupted preparation: re-run the same prepare command to finish it)"
                    if (self.path / "progress.json").is_file() else "")
            raise DataError(f"{self.path}: not a prepared dataset, no meta.json{hint}; create one with "
                            "python -m gorilla_dist.data.prepare input=... output=...")
        if verify not in VERIFY:
            raise DataError(f"data.verify={verify!r}: expected one of {list(VERIFY)}")
        self.meta = meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format {meta.get('format')!r}, this version reads format {FORMAT}")
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.vocab_size, self.eod = meta["tokenizer"]["vocab_size"], meta["tokenizer"]["eod"]
        self._check(self.path / "tokenizer.json", None, meta["tokenizer"]["sha256"], verify)
        self.shards, self.masks = [], []
        self.examples = "examples" in meta  # instruction data: one example per document, a loss mask per token
        for shard in meta["shards"]:
            file = self.path / shard["file"]
            self._check(file, shard["tokens"] * self.dtype.itemsize, shard["sha256"], verify)
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r"))
            if self.examples:
                mask = self.path / shard["mask"]["file"]
                self._check(mask, shard["tokens"], shard["mask"]["sha256"], verify)
                self.masks.append(np.memmap(mask, dtype=np.uint8, mode="r"))
        self.label_names, self.labels = None, None
        labels = meta.get("examples", {}).get("labels")
        if labels:  # (documents, 2) int32: class id, index of the example's last prompt token
            self.label_names = list(labels["names"])
            self._check(self.path / labels["file"], 8 * int(meta["documents"]), labels["sha256"], verify)
            self.labels = np.memmap(self.path / labels["file"], dtype=np.int32, mode="r").reshape(-1, 2)
        self.starts = np.cumsum([0] + [s["tokens"] for s in meta["shards"]]).tolist()
        index = self.path / meta["index"]["file"]
        self._check(index, 8 * (meta["documents"] + 1), meta["index"]["sha256"], verify)
        self.offsets = np.memmap(index, dtype=np.int64, mode="r")  # (documents + 1,)
        self.tokens, self.documents = int(meta["tokens"]), int(meta["documents"])
        if self.starts[-1] != self.tokens or int(self.offsets[-1]) != self.tokens:
            raise DataError(f"{meta_path}: shards hold {self.starts[-1]} tokens, the index ends at "
                            f"{int(self.offsets[-1])}, meta.json says {self.tokens}; re-run prepare")

    @staticmethod
    def _check(file: Path, size: int | None, sha256: str, verify: str) -> None:
        if not file.is_file():
            raise DataError(f"{file}: missing from the prepared dataset; re-run prepare")
        actual = file.stat().st_size
        if size is not None and actual != size:
            raise DataError(f"{file}: {actual} bytes, meta.json expects {size}: the file is truncated or was "
                            "replaced; re-run prepare into a new output")
        if verify == "checksum" and sha256_file(file) != sha256:
            raise DataError(f"{file}: sha256 does not match meta.json: the file is corrupted; re-run prepare "
                            "into a new output")

    def read(self, start: int, stop: int, *, mask: bool = False) -> np.ndarray:
        """Tokens [start, stop) of the stream (a view when inside one shard); their loss mask with mask=True."""
        files = self.masks if mask else self.shards
        i = bisect_right(self.starts, start) - 1
        if stop <= self.starts[i + 1]:
            return files[i][start - self.starts[i]:stop - self.starts[i]]
        parts = []
        while start < stop:
            i = bisect_right(self.starts, start) - 1
            end = min(stop, self.starts[i + 1])
            parts.append(files[i][start - self.starts[i]:end - self.starts[i]])
            start = end
        return np.concatenate(parts)

    def split(self, val_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
        """Token ranges (train, val), split by documents: the last `val_fraction` of the documents are
        validation (Megatron's contiguous split; for a single book-like corpus it is the tail)."""
        n_val = 0 if val_fraction <= 0 else max(1, round(self.documents * val_fraction))
        if val_fraction > 0 and n_val >= self.documents:
            raise DataError(f"{self.path}: {self.documents} document(s) cannot be split into train and validation "
                            f"by data.val_fraction={val_fraction}; a split by documents needs more documents "
                            "(prepare .txt input with sample_by=paragraph or line) or data.val_fraction=0")
        cut = int(self.offsets[self.documents - n_val])
        return (0, cut), (cut, self.tokens)


class Span:
    """Packed fixed-length samples of the token range [start, stop) of a dataset."""

    examples = False

    def __init__(self, data: TokenDataset, start: int, stop: int, seq_length: int):
        self.data, self.start, self.stop, self.seq = data, start, stop, seq_length
        self.samples = max(0, -(-(stop - start - 1) // seq_length))

    def window(self, j: int, out: np.ndarray) -> int:
        """Write sample j (seq + 1 tokens) into `out`; returns how many are real (the rest is <eod> padding)."""
        a = self.start + j * self.seq
        b = min(a + self.seq + 1, self.stop)
        out[:b - a] = self.data.read(a, b)
        out[b - a:] = self.data.eod
        return b - a


class ExampleSpan:
    """Packed samples of the whole instruction examples (documents) in the token range [start, stop).

    pack=False puts one example in each sample. An example longer than seq + 1 tokens is refused, or
    with truncate=True cut to its first seq + 1 tokens (`truncated` counts them)."""

    examples = True

    def __init__(self, data: TokenDataset, start: int, stop: int, seq_length: int, *, pack: bool = True,
                 truncate: bool = False):
        self.data, self.seq = data, seq_length
        offsets = np.asarray(data.offsets)
        d0, d1 = (int(i) for i in np.searchsorted(offsets, [start, stop]))
        lengths = np.diff(offsets[d0:d1 + 1])
        cap = seq_length + 1
        self.truncated = int((lengths > cap).sum())
        if self.truncated and not truncate:
            raise DataError(f"{data.path}: {self.truncated} of {len(lengths)} examples are longer than "
                            f"model.seq_length + 1 = {cap} tokens (the longest has {int(lengths.max())}); an example "
                            "is never split across samples. Raise model.seq_length, or set data.truncate=true to "
                            "keep the first tokens of each")
        firsts, fill = [], cap
        for i, n in enumerate(np.minimum(lengths, cap).tolist()):  # next-fit: a new sample when it is full
            if not pack or fill + n > cap:
                firsts.append(i)
                fill = 0
            fill += n
        self.first = (d0 + np.array(firsts + [len(lengths)], dtype=np.int64))  # (samples + 1,) example ranges
        self.samples = len(firsts)
        self.tokens = int(np.minimum(lengths, cap).sum())

    def window(self, j: int, out: np.ndarray, segments: np.ndarray, targets: np.ndarray,
               classes: np.ndarray | None = None) -> int:
        """Write sample j's tokens (padded with <eod>), each token's example number within the sample
        (padding: one more) and its loss mask (padding: 0); returns the number of real tokens. `classes`
        (labelled data): each example's class id at its last prompt token, -1 elsewhere (an example
        truncated before that token has none)."""
        offs = np.asarray(self.data.offsets[self.first[j]:self.first[j + 1] + 1])  # (k + 1,)
        n = min(int(offs[-1] - offs[0]), self.seq + 1)  # (only a single truncated example is cut)
        a = int(offs[0])
        out[:n] = self.data.read(a, a + n)
        out[n:] = self.data.eod
        lens = np.minimum(np.diff(offs), n)
        segments[:n] = np.repeat(np.arange(len(lens), dtype=segments.dtype), lens)
        segments[n:] = len(lens)
        targets[:n] = self.data.read(a, a + n, mask=True)
        targets[n:] = 0
        if classes is not None:
            classes[:] = -1
            if self.data.labels is not None:
                table = np.asarray(self.data.labels[self.first[j]:self.first[j + 1]])
                at = offs[:-1] - a + table[:, 1]
                keep = at < min(n, self.seq)  # an input position of this sample
                classes[at[keep]] = table[keep, 0]
        return n
