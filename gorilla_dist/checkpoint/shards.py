"""Checkpoint shards: every rank writes its own part of every layout-free tensor, readers join them.

A rank's parts (engine.local_state: its ZeRO partition of its tensor-parallel shard of each fp32 master
and AdamW moment) go into two files of its own, written by all ranks at once:
    shards/model-rank00003.safetensors      weights
    shards/optimizer-rank00003.safetensors  moments, `<param>.exp_avg` / `<param>.exp_avg_sq`
Each part is a 1-D fp32 tensor stored under the single-process name; the file's metadata "fragments"
(JSON) says, per name, the single-process shape, the tensor-parallel split (rank, size, dim, gated) and
the TP shard's shape, and where in the flattened shard the part starts. Nothing is gathered to save.

Reading (ShardedTensors) joins one whole tensor at a time from the parts that hold it, read from the
files straight into it (no mapping, no intermediate copies): per TP rank its ranges must tile the
flattened shard exactly (else a CheckpointError naming the tensor), then the TP
shards join as tp_join says. So a reader never holds more than one tensor, whatever the layout that
wrote the shards, and any layout resumes them.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from gorilla_dist.checkpoint.tensorfile import write_streaming
from gorilla_dist.engine import tp_join
from gorilla_dist.errors import CheckpointError

SHARDS = "shards"
MODEL = "model"
OPTIMIZER = "optimizer"


def shard_name(kind: str, rank: int) -> str:
    """A rank's shard file, relative to the checkpoint directory."""
    return f"{SHARDS}/{kind}-rank{rank:05d}.safetensors"


def write_shard(path: Path, pieces: dict, step: int) -> dict:
    """Write a rank's Pieces (engine.local_state) of one kind; returns the manifest entry."""
    index = {k: {"shape": list(p.shape), "tp": list(p.tp) if p.tp else None, "local": list(p.local), "start": p.start}
             for k, p in pieces.items()}
    return write_streaming(path, [(k, torch.float32, (p.data.numel(),)) for k, p in pieces.items()],
                           lambda k: pieces[k].data, {"step": str(step), "fragments": json.dumps(index)})


def has_shards(ckpt: Path, kind: str) -> bool:
    return any((Path(ckpt) / SHARDS).glob(f"{kind}-rank*.safetensors"))


class ShardedTensors:
    """The safetensors-handle interface (keys, get_tensor, get_slice(k).get_shape()) over every rank's
    shard of one kind in a checkpoint; get_tensor joins the whole single-process tensor."""

    def __init__(self, ckpt: Path, kind: str):
        self.where = f"{Path(ckpt) / SHARDS}/{kind}-rank*.safetensors"
        files = sorted((Path(ckpt) / SHARDS).glob(f"{kind}-rank*.safetensors"))
        if not files:
            raise CheckpointError(f"{ckpt} has no {kind} shards ({self.where})")
        self.parts: dict[str, list] = {}
        for f in files:
            header, data_start = read_header(f)
            try:
                index = json.loads(header.get("__metadata__", {})["fragments"])
            except (KeyError, ValueError) as err:
                raise CheckpointError(f"{f}: not a checkpoint shard (its metadata has no readable fragment "
                                      f"index: {err})") from None
            for key, entry in index.items():
                begin, end = header[key]["data_offsets"]
                self.parts.setdefault(key, []).append((f, entry, data_start + begin, (end - begin) // 4))

    def keys(self) -> list[str]:
        return list(self.parts)

    def get_slice(self, key: str):
        return _Shape(self.parts[key][0][1]["shape"])

    def get_tensor(self, key: str) -> torch.Tensor:
        parts = self.parts[key]
        shape, tp = parts[0][1]["shape"], parts[0][1]["tp"]
        size = tp[1] if tp else 1
        by_rank: dict[int, list] = {}
        for f, entry, offset, numel in parts:
            if entry["shape"] != shape or (entry["tp"] or [0, 1])[1:] != (tp or [0, 1])[1:]:
                raise CheckpointError(f"{self.where}: the parts of {key} disagree on its shape or tensor-parallel "
                                      f"split ({f.name}: {entry}; {parts[0][0].name}: {parts[0][1]})")
            by_rank.setdefault(entry["tp"][0] if entry["tp"] else 0, []).append((entry["start"], f, entry, offset, numel))
        if sorted(by_rank) != list(range(size)):
            raise CheckpointError(f"{self.where}: {key} is split over {size} tensor-parallel ranks, the shards hold "
                                  f"parts of ranks {sorted(by_rank)} only (a shard file is missing)")
        shards = []
        for rank in range(size):
            local = by_rank[rank][0][2]["local"]
            flat, at = torch.empty(math.prod(local), dtype=torch.float32), 0
            for start, f, _, offset, numel in sorted(by_rank[rank], key=lambda x: x[0]):
                if start != at or at + numel > flat.numel():
                    raise CheckpointError(f"{self.where}: {key} (TP rank {rank}) has "
                                          f"{'no part for' if start > at else 'overlapping parts at'} elements "
                                          f"{min(at, start)}..{max(at, start)} ({f.name}); a shard is "
                                          "missing or from another save")
                _read_into(f, offset, flat[at:at + numel])
                at += numel
            if at != flat.numel():
                raise CheckpointError(f"{self.where}: {key} (TP rank {rank}) has parts for {at} of its "
                                      f"{flat.numel()} elements; a shard is missing")
            shards.append(flat.view(local))
        return shards[0].view(shape) if tp is None else tp_join(shards, tp[2], bool(tp[3]))


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset its data start at."""
    with open(path, "rb") as f:
        raw = f.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if size is None or size > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (no header)")
        try:
            return json.loads(f.read(size)), 8 + size
        except ValueError as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None


def _read_into(path: Path, offset: int, out: torch.Tensor) -> None:
    """Read out.numel() fp32 values at byte `offset` of `path` straight into `out` (contiguous): no
    mapping of the file and no intermediate copy, so a reader holds only the tensor it joins."""
    view = memoryview(out.numpy()).cast("B")
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(view)
    if got != len(view):
        raise CheckpointError(f"{path}: ends {len(view) - got} bytes early (truncated)")


class _Shape:
    def __init__(self, shape):
        self.shape = list(shape)

    def get_shape(self):
        return self.shape
