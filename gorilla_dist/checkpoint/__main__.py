"""`python -m gorilla_dist.checkpoint consolidate run.dir=... out=model.safetensors [checkpoint=...]
[dtype=...]`: one layout-free weights file from a run's checkpoint, with the run's config, step and
tokenizer in its metadata."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gorilla_dist.checkpoint import open_weights, resolve_checkpoint
from gorilla_dist.checkpoint.tensorfile import write_streaming
from gorilla_dist.dtypes import TORCH_DTYPES
from gorilla_dist.errors import UserError


USAGE = ("usage: python -m gorilla_dist.checkpoint consolidate run.dir=<run> out=<file.safetensors> "
         "[checkpoint=latest|<dir>] [dtype=fp32|bf16|fp16]")


@dataclass
class ConsolidateArgs:
    run_dir: str | None = None
    """The training run's directory (run.dir=...)."""
    out: str | None = None
    """The file to write (safetensors); it must not exist yet."""
    checkpoint: str = "latest"
    """latest (newest usable checkpoint of run.dir) or a checkpoint directory."""
    dtype: str = "fp32"
    """Weights are stored as fp32 masters; cast to fp32 | bf16 | fp16 on the way out."""


def consolidate(args) -> tuple[Path, Path, int]:
    """One layout-free weights file from a run's checkpoint, with the run's config and step in its
    metadata. Returns (checkpoint used, file written, parameter count)."""
    if not args.run_dir or not args.out:
        raise UserError(USAGE)
    if args.dtype not in TORCH_DTYPES:
        raise UserError(f"dtype={args.dtype!r} is not valid; choose one of: {', '.join(TORCH_DTYPES)}")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"out={out} already exists; not overwriting it (remove it or choose another out=)")
    ckpt = resolve_checkpoint(args.run_dir, args.checkpoint)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    metadata = {"format": "gorilla_dist", "step": str(manifest["step"]), "dtype": args.dtype,
                "written_by_layout": json.dumps(manifest.get("layout", {})),
                "config": (ckpt / "config.yaml").read_text()}
    tokenizer = Path(args.run_dir) / "tokenizer.json"
    if tokenizer.is_file():  # so that the file alone can be exported (python -m gorilla_dist.export consolidated=)
        metadata["tokenizer"] = tokenizer.read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    dtype = TORCH_DTYPES[args.dtype]
    with open_weights(ckpt) as w:  # one whole tensor at a time (joined from the shards, or overlaid on a base)
        specs = [(k, dtype, tuple(w.get_slice(k).get_shape())) for k in w.keys()]
        write_streaming(tmp, specs, lambda k: w.get_tensor(k).to(dtype), metadata)
    os.replace(tmp, out)
    return ckpt, out, sum(math.prod(shape) for _, _, shape in specs)


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import parse_key_values, run_tool

    def body() -> int:
        if not argv or argv[0] != "consolidate":
            raise UserError(USAGE)
        args = parse_key_values(argv[1:], ConsolidateArgs, aliases={"run.dir": "run_dir"})
        ckpt, out, n = consolidate(args)
        print(f"[consolidate] {out}: {n:,} parameters ({args.dtype}) from {ckpt}", flush=True)
        return 0

    return run_tool(body)


if __name__ == "__main__":
    from gorilla_dist.engine.startup import exit_now

    exit_now(main(sys.argv[1:]))  # skips the interpreter's slow finalization (engine/startup.exit_now)
