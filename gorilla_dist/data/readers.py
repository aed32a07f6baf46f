"""Input files → a stream of documents (str), never holding more than one document in memory.

Formats, by suffix:
  .txt                 documents split by `sample_by`: document (the whole file) | paragraph (separated by
                       blank lines; each keeps its trailing newline) | line (each line, without its newline)
  .jsonl, .jsonl.gz    one JSON object per line, the text in `field`
  .parquet             the text column `field`
With `records=True` (instruction data) the reader yields (row, where) for .jsonl[.gz] / .parquet rows
instead: the whole JSON object or parquet row, and "file:line" (or "file row n") for messages.
Files are read in a fixed order (inputs in the order given; directories and globs sorted), so the
document order, and therefore every shard, is reproducible.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from pathlib import Path

from gorilla_dist.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
SAMPLE_BY = ("document", "paragraph", "line")
ON_DECODE_ERROR = ("fail", "skip")


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs → the sorted, de-duplicated input files."""
    if not specs:
        raise DataError(f"input= is required: files, directories or globs of {', '.join(SUFFIXES)} files")
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if any(c in spec for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
            if not found:
                raise DataError(f"input={spec!r}: the pattern matches no files")
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
            if not found:
                raise DataError(f"input={spec!r}: the directory holds no {', '.join(SUFFIXES)} files")
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"input={spec!r}: no such file or directory")
        supported = [p for p in found if _supported(p)]
        if not supported:
            raise DataError(f"input={spec!r}: {found[0].name} is not a supported format; "
                            f"expected {', '.join(SUFFIXES)}")
        files += supported
    seen: set[Path] = set()
    return [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]


class BadRecord(str):
    """What a records reader yields for a line that is not JSON (its message)."""


class DocumentReader:
    """Iterate the documents of `files`. `bytes_done` (input bytes consumed, compressed for .gz) and
    `skipped` (documents dropped under on_decode_error=skip) are updated as it goes."""

    def __init__(self, files: list[Path], *, field: str = "text", sample_by: str = "document",
                 on_decode_error: str = "fail", records: bool = False):
        if sample_by not in SAMPLE_BY:
            raise DataError(f"sample_by={sample_by!r}: expected one of {list(SAMPLE_BY)}")
        if on_decode_error not in ON_DECODE_ERROR:
            raise DataError(f"on_decode_error={on_decode_error!r}: expected one of {list(ON_DECODE_ERROR)}")
        self.files, self.field, self.sample_by, self.policy = files, field, sample_by, on_decode_error
        self.records = records
        if records and (txt := [p for p in files if p.name.endswith(".txt")]):
            raise DataError(f"{txt[0]}: instruction data is read from .jsonl, .jsonl.gz or .parquet rows "
                            "(instruction/input/output or messages), not .txt")
        self.total_bytes = sum(p.stat().st_size for p in files)
        self.bytes_done = 0
        self.skipped = 0
        self.current: Path | None = None  # the file being read

    def __iter__(self):
        done = 0
        for path in self.files:
            self.current, name = path, path.name
            if name.endswith(".txt"):
                docs = self._txt(path, done)
            elif name.endswith(".parquet"):
                docs = self._parquet(path, done)
            else:
                docs = self._jsonl(path, done)
            yield from docs
            done += path.stat().st_size
            self.bytes_done = done

    def _decode(self, raw: bytes, where: str) -> str | None:
        """UTF-8 text, or None when the document is skipped under on_decode_error=skip."""
        problem = None
        if b"\x00" in raw:
            problem = "contains NUL bytes (binary data?)"
        else:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = f"is not valid UTF-8 (byte {err.start} of the document: {raw[err.start:err.start + 4]!r})"
        if self.policy == "skip":
            self.skipped += 1
            return None
        raise DataError(f"{where}: the document {problem}; to skip such documents, prepare with "
                        "on_decode_error=skip")

    def _txt(self, path: Path, base: int):
        with open(path, "rb") as f:
            if self.sample_by == "document":
                text = self._decode(f.read(), f"{path}")
                self.bytes_done = base + f.tell()
                if text and text.strip():
                    yield text
                return
            para: list[bytes] = []
            start = 1
            for lineno, line in enumerate(f, 1):
                if self.sample_by == "line":
                    raw = line.rstrip(b"\r\n")
                    text = self._decode(raw, f"{path}:{lineno}") if raw.strip() else None
                elif line.strip():  # paragraph: collect non-blank lines
                    start = lineno if not para else start
                    para.append(line)
                    continue
                else:
                    text = self._decode(b"".join(para), f"{path}:{start}") if para else None
                    para = []
                self.bytes_done = base + f.tell()
                if text is not None:
                    yield text
            if para:  # the last paragraph; it keeps a trailing newline like the others
                text = self._decode(b"".join(para).rstrip(b"\r\n") + b"\n", f"{path}:{start}")
                if text is not None:
                    yield text

    def _jsonl(self, path: Path, base: int):
        raw_file = open(path, "rb")  # noqa: SIM115 - closed below; its position is the progress
        f = gzip.open(raw_file, "rb") if path.name.endswith(".gz") else raw_file
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                text = self._decode(line, where)
                if text is None:
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    problem = f"{where}: not a JSON object ({err.msg} at column {err.colno})"
                    if not self.records:
                        raise DataError(problem) from None
                    obj = BadRecord(problem)  # instruction data: a bad row, which on_bad_row decides about
                if self.records:
                    self.bytes_done = base + raw_file.tell()
                    yield obj, where
                    continue
                if not isinstance(obj, dict) or self.field not in obj:
                    fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{where}: no field {self.field!r} (found {fields}); set field=<name>")
                value = obj[self.field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(f"{where}: field {self.field!r} is a {type(value).__name__}, expected a string")
                self.bytes_done = base + raw_file.tell()
                if value.strip():
                    yield value
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{path}: truncated or corrupt gzip file ({err})") from None
        finally:
            f.close()
            raw_file.close()

    def _parquet(self, path: Path, base: int):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        names = pf.schema_arrow.names
        if self.records:
            yield from self._parquet_rows(pf, path, base)
            return
        if self.field not in names:
            raise DataError(f"{path}: no column {self.field!r} (columns: {names}); set field=<name>")
        rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
        done = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[self.field]):
            for value in batch.column(0).to_pylist():
                if value is None:
                    continue
                if isinstance(value, bytes):
                    value = self._decode(value, f"{path} row {done}")
                    if value is None:
                        continue
                if not isinstance(value, str):
                    raise DataError(f"{path}: column {self.field!r} holds {type(value).__name__}, expected strings")
                if value.strip():
                    yield value
            done += batch.num_rows
            self.bytes_done = base + size * done // rows

    def _parquet_rows(self, pf, path: Path, base: int):
        rows, size = max(pf.metadata.num_rows, 1), path.stat().st_size
        done = 0
        for batch in pf.iter_batches(batch_size=1024):
            for i, row in enumerate(batch.to_pylist()):
                yield row, f"{path} row {done + i}"
            done += batch.num_rows
            self.bytes_done = base + size * done // rows
