"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once (and copies them into one buffer);
a checkpoint of a large model must not. The format is simple enough to stream: an 8-byte little-endian
header length, a JSON header (every tensor's dtype, shape and byte offsets, plus string metadata), then
the raw bytes in header order. The header is written first from the names, dtypes and shapes alone,
then each tensor as it comes; the sha256 and size are computed while writing (the manifest's entry,
without reading the file back). The result is an ordinary safetensors file (safe_open reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class _Hashing:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)


def write_streaming(path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                    produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write a safetensors file holding `specs` (name, dtype, shape; in this order), asking
    `produce(name)` for each tensor only when its turn comes (and dropping it right after), fsynced.
    Returns the manifest entry {"size", "sha256"}."""
    specs = list(specs)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        out = _Hashing(f)
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name, dtype, shape in specs:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: {name} came as {t.dtype} {tuple(t.shape)}, the header says "
                                 f"{dtype} {tuple(shape)}")
            if t.numel():
                out.write(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    return {"size": out.size, "sha256": out.sha.hexdigest()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """A dict of tensors (already in memory) through write_streaming; returns its manifest entry."""
    return write_streaming(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors.__getitem__,
                           metadata)
