"""Atomic checkpoints with auto-resume.

Layout of one checkpoint (`run.dir/checkpoints/step_00000500/`):
    ds/                    DeepSpeed engine state: module, optimizer (ZeRO partitions), LR schedule
    trainer_rank*.pt       per-rank framework state: step, data position, RNG (tensors only)
    model.safetensors      consolidated, layout-free weights (TP shards merged, ZeRO-3 gathered)
    config.yaml            the resolved config that produced it
    manifest.json          written last: every file with its size and sha256; a checkpoint is complete
                           iff it has a manifest whose sizes match, and usable iff the checksums match too
                           (checked for the one a run resumes from or generate loads)
Everything is written into `.tmp-step_XXXXXXXX/` and renamed into place, so an interrupted save never
looks like a checkpoint. Incomplete checkpoints are reported and skipped, never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gorilla_dist import faults
from gorilla_dist.errors import CheckpointError
from gorilla_dist.files import sha256_file
from gorilla_dist.parallel import on_main

STEP_DIR = re.compile(r"^step_(\d{8})$")
WEIGHTS = "model.safetensors"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(ckpt: Path, *, checksums: bool = False) -> str | None:
    """None if `ckpt` is a complete checkpoint, else why not. Sizes always; sha256 with checksums=True
    (reads every file: done once, for the checkpoint about to be loaded)."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    for rel, entry in files.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    if checksums:
        for rel, entry in files.items():
            if not isinstance(entry, int) and sha256_file(ckpt / rel) != entry["sha256"]:
                return f"{rel}: sha256 does not match the manifest (the file is corrupted)"
    return None


def newest_usable(root: Path, *, report: bool) -> Path | None:
    """The newest complete checkpoint whose checksums match; corrupted ones are reported and skipped."""
    for ckpt in reversed(complete_checkpoints(root, report=report)):
        problem = verify(ckpt, checksums=True)
        if problem is None:
            return ckpt
        if report:
            print(f"[checkpoint] skipping corrupted checkpoint {ckpt}: {problem}", file=sys.stderr)
    return None


def complete_checkpoints(root: Path, *, report: bool = False) -> list[Path]:
    """Complete checkpoints under root, oldest first. With report=True, say which were skipped."""
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not STEP_DIR.match(d.name):
            if report and d.name.startswith(".tmp-"):
                print(f"[checkpoint] ignoring {d}: an interrupted save", file=sys.stderr)
            continue
        problem = verify(d)
        if problem is None:
            found.append(d)
        elif report:
            print(f"[checkpoint] skipping incomplete checkpoint {d}: {problem}", file=sys.stderr)
    return found


def consolidated_state_dict(module: torch.nn.Module, *, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 parameters as the single-process model names them. Collective: every rank calls it.

    ZeRO-3 partitions are gathered over data parallel; tensor-parallel shards are all-gathered over
    the TP group and concatenated along their `partition_dim` (megatron-core's fused QKV layout is
    grouped by query group, so the concatenation is the TP=1 layout). Gated MLPs keep [gate; up]
    per rank, so their shards are re-interleaved into the TP=1 [gate; up] order.
    """
    from megatron.core import parallel_state as ps

    from gorilla_dist.parallel import tp_all_gather

    tp = ps.get_tensor_model_parallel_world_size()
    gated = getattr(getattr(module, "config", None), "gated_linear_unit", False)
    out = {}
    for name, p in module.named_parameters():
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().float().clone()
        else:
            full = p.data.detach().float().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            dim = p.partition_dim
            shards = tp_all_gather(full)
            if gated and "linear_fc1" in name:
                halves = [s.chunk(2, dim=dim) for s in shards]
                shards = [h[0] for h in halves] + [h[1] for h in halves]
            full = torch.cat(shards, dim=dim)
        out[name] = full.cpu().contiguous()
    return out


def load_consolidated(model: torch.nn.Module, path: Path) -> None:
    """Load a consolidated weights file into a single-process (TP=1) model; every parameter must be there."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit this model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, "
                                      f"the model expects {tuple(p.shape)}")
            p.copy_(state[name])


def resolve_checkpoint(run_dir: str | os.PathLike, which: str = "latest") -> Path:
    """`latest` (newest complete checkpoint of a run) or an explicit checkpoint directory."""
    if which != "latest":
        ckpt = Path(which)
        problem = verify(ckpt, checksums=True)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is not usable: {problem}")
        return ckpt
    found = newest_usable(Path(run_dir) / "checkpoints", report=True)
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    return found


class Checkpointer:
    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout
        self.root = Path(cfg.run.dir) / "checkpoints"
        self.interval, self.keep = cfg.checkpoint.interval, cfg.checkpoint.keep

    def due(self, step: int, last: bool) -> bool:
        return last or (self.interval > 0 and step % self.interval == 0)

    def _layout(self) -> dict:
        return {"world": self.layout.world, "tp": self.layout.tp, "zero_stage": self.cfg.parallel.zero_stage,
                "precision": self.cfg.precision.dtype}

    def save(self, step: int, engine, trainer_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint directory. Refuses (on every
        rank alike, before writing anything) a model with inf/NaN weights."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        weights = consolidated_state_dict(engine.module, zero_stage=self.cfg.parallel.zero_stage)
        bad = [name for name, w in weights.items() if not torch.isfinite(w).all()]
        if bad:
            raise CheckpointError(f"step {step}: the model has non-finite (inf/NaN) weights in {len(bad)} tensors "
                                  f"({', '.join(bad[:3])}); not saving it, the checkpoints in {self.root} are "
                                  "unchanged")
        fault = {"step": step, "rank": self.layout.rank}
        if self.layout.is_main:
            if tmp.exists():
                print(f"[checkpoint] removing {tmp}, left by an interrupted save of the same step", file=sys.stderr)
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        faults.hit("checkpoint.begin", **fault)
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save(trainer_state, tmp / f"trainer_rank{self.layout.rank:05d}.pt")
        faults.hit("checkpoint.engine_saved", **fault)
        if self.layout.is_main:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(step)})
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        faults.hit("checkpoint.weights_saved", **fault)
        _barrier()
        if self.layout.is_main:
            files = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
            manifest = {"step": step, "layout": self._layout(), "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            faults.hit("checkpoint.manifest_written", **fault)
            if final.exists():  # an earlier attempt at this step (complete or not): replace it whole
                print(f"[checkpoint] replacing {final} (problem: {verify(final) or 'none'})", file=sys.stderr)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            faults.hit("checkpoint.renamed", **fault)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in complete_checkpoints(self.root)[:-self.keep]:
            shutil.rmtree(old)

    def find_resume(self) -> Path | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            if complete_checkpoints(self.root):
                raise CheckpointError(f"checkpoint.resume=never but {self.root} already holds checkpoints; "
                                      "use a new run.dir or checkpoint.resume=auto (nothing was deleted)")
            return None
        # rank 0 reads and checks (checksums read every file); every rank resumes from what it chose
        if mode == "auto":
            return on_main(lambda: newest_usable(self.root, report=True), self.layout)
        return on_main(lambda: resolve_checkpoint(self.cfg.run.dir, mode), self.layout)

    def load(self, ckpt: Path, engine) -> dict:
        """Restore engine state from `ckpt`; returns this rank's trainer state."""
        manifest = json.loads((ckpt / "manifest.json").read_text())
        saved, now = manifest["layout"], self._layout()
        if {k: saved[k] for k in ("world", "tp", "zero_stage")} != {k: now[k] for k in ("world", "tp", "zero_stage")}:
            raise CheckpointError(
                f"{ckpt} was saved with world={saved['world']} tp={saved['tp']} zero_stage={saved['zero_stage']}, "
                f"this run has world={now['world']} tp={now['tp']} zero_stage={now['zero_stage']}; resume with "
                "the same layout (layout-changing resume is not supported yet)")
        path, _ = engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt / 'ds'}")
        return torch.load(ckpt / f"trainer_rank{self.layout.rank:05d}.pt", weights_only=True)
