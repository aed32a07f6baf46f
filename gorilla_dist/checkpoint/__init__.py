"""Atomic checkpoints with auto-resume.

Layout of one checkpoint (`run.dir/checkpoints/step_00000500/`); nothing in it depends on the parallel
layout (TP size, data-parallel size, ZeRO stage, precision) that wrote it, so any layout resumes it
(gorilla_dist.engine.state):
    shards/model-rank*.safetensors      every rank's own parts of the fp32 master weights, and
    shards/optimizer-rank*.safetensors  of the AdamW moments (`<param>.exp_avg` / `.exp_avg_sq`), under
                           single-process names: written by all ranks at once, nothing gathered; readers
                           join one whole tensor at a time (shards.py)
    model.safetensors      optional (checkpoint.consolidated; auto: models up to 2 GiB of fp32 weights):
                           the whole weights in one file, written by rank 0 from the shards, tensor by
                           tensor; readers prefer it (it is exactly the joined shards)
    trainer.json           step, AdamW step count, LR schedule, DeepSpeed's counters, data position
    rng_rank*.safetensors  each rank's RNG state (restored when the world size is unchanged)
    config.yaml            the resolved config that produced it
    base.json              fine-tuning with frozen parameters only (finetune.method=freeze): the path of
                           the base checkpoint and the sha256 of its weights; the weights and moments
                           then hold the trainable parameters only, and readers overlay them on the base
    manifest.json          written last: every file with its size and sha256 (each rank hashes its own
                           files as it writes them); a checkpoint is complete iff it has a manifest
                           whose sizes match, and usable iff the checksums match too (checked for the
                           one a run resumes from or generate loads)
Checkpoints written before shards (model.safetensors + optimizer.safetensors, no shards/) load as ever.
Everything is written into `.tmp-step_XXXXXXXX/` and renamed into place, so an interrupted save never
looks like a checkpoint. Incomplete checkpoints are reported and skipped; one is deleted only when the
run saves that same step again (the new save replaces the leftover, and says so). Loading
reads safetensors and JSON only: a checkpoint cannot run code (no pickle).

`python -m gorilla_dist.checkpoint consolidate run.dir=... out=model.safetensors` (checkpoint/__main__.py)
writes one weights file (with the config in its metadata) from a run's newest usable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from gorilla_dist import faults
from gorilla_dist.checkpoint.shards import MODEL, OPTIMIZER, SHARDS, ShardedTensors, shard_name, write_shard
from gorilla_dist.checkpoint.tensorfile import write_streaming, write_tensors
from gorilla_dist.config import check_checkpoint_source, check_init_source
from gorilla_dist.data.tokenizer import same_tokenizer
from gorilla_dist.engine import check_fits, load_trained_buffers, model_shapes
from gorilla_dist.engine.rng import rng_state, set_rng_state
from gorilla_dist.errors import CheckpointError
from gorilla_dist.files import sha256_file
from gorilla_dist.finetune import is_adapter
from gorilla_dist.model.head import HEADS
from gorilla_dist.hf_import import check_tokenizer, hf_dir
from gorilla_dist.hf_import import converted as hf_converted
from gorilla_dist.hf_import import identity as hf_identity
from gorilla_dist.parallel import on_main

STEP_DIR = re.compile(r"^step_(\d{8})$")
WEIGHTS = "model.safetensors"
MOMENTS = "optimizer.safetensors"
TRAINER = "trainer.json"
BASE = "base.json"
CONSOLIDATE_AUTO_BYTES = 2 * 2**30
"""checkpoint.consolidated=auto writes model.safetensors when the fp32 weights are at most this big."""


def _all_gather(obj) -> list:
    """Every rank's `obj` (a small JSON-like value), in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def base_identity(ckpt: Path) -> dict:
    """What an adapter checkpoint records of its base: the base checkpoint's path and its weights'
    sha256 (model.safetensors' when it has one, else a sha256 over its model shards' sha256s; from the
    manifest: nothing is read)."""
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    if WEIGHTS in files:
        return {"path": str(Path(ckpt).resolve()), "sha256": files[WEIGHTS]["sha256"]}
    shards = sorted(k for k in files if k.startswith(f"{SHARDS}/{MODEL}-"))
    digest = hashlib.sha256("".join(f"{k} {files[k]['sha256']}\n" for k in shards).encode()).hexdigest()
    return {"path": str(Path(ckpt).resolve()), "sha256": digest}


def base_of(ckpt: Path, *, check: bool = True) -> Path | str | None:
    """The base an adapter checkpoint was fine-tuned from (None for a whole-model checkpoint): a checkpoint
    directory, or "hf:<dir>" (a transformers model), checked to be usable and to hold the very weights it
    was trained on (which reads all of them: check=False when one rank has checked, see verify_bases)."""
    if not (ckpt / BASE).is_file():
        return None
    want = json.loads((ckpt / BASE).read_text())
    hf = hf_dir(want["path"])
    base = hf if hf is not None else Path(want["path"])
    if not check:
        return want["path"] if hf is not None else base
    if hf is not None:
        problem = None if (hf / "config.json").is_file() else "the directory is gone"
    else:
        problem = verify(base, checksums=True) if base.is_dir() else "the directory is gone"
    if problem:
        raise CheckpointError(f"{ckpt} holds the fine-tuned parameters only; the rest come from its base "
                              f"{want['path']}, which is not usable ({problem}); restore it there")
    have = hf_identity(hf)["sha256"] if hf is not None else base_identity(base)["sha256"]
    if have != want["sha256"]:
        raise CheckpointError(f"{ckpt} was fine-tuned from weights with sha256 {want['sha256'][:16]}..., but "
                              f"{want['path']} now holds other weights ({have[:16]}...): a different base; restore the "
                              "original base there")
    return want["path"] if hf is not None else base


class _Overlay:
    """The safetensors-handle interface over several files: the first that has a name answers."""

    def __init__(self, handles):
        self.handles = handles

    def keys(self):
        return list(dict.fromkeys(k for h in self.handles for k in h.keys()))

    def _owner(self, key: str):
        return next(h for h in self.handles if key in h.keys())

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._owner(key).get_tensor(key)

    def get_slice(self, key: str):
        return self._owner(key).get_slice(key)


def verify_bases(ckpt: Path | str, layout) -> None:
    """Rank 0 checks the chain of bases under an adapter checkpoint (base_of: every base's weights are
    hashed); every rank raises its error. Then open_weights(ckpt, checked=True) on every rank."""

    def walk() -> None:
        at = ckpt
        while at is not None and hf_dir(str(at)) is None:
            at = base_of(Path(at))

    on_main(walk, layout)


@contextmanager
def open_weights(ckpt: Path | str, *, model=None, vocab_size: int | None = None, checked: bool = False):
    """A checkpoint's model weights as a safetensors handle (read one tensor at a time); an adapter
    checkpoint's tensors overlaid on its base's (and the base's on its own base, if it has one). A base
    "hf:<dir>" (or `ckpt` itself) is converted for model config `model` and `vocab_size` ids (both read
    from the adapter checkpoint's run when not given). checked: verify_bases has checked the bases."""
    with ExitStack() as stack:
        handles = []
        while ckpt is not None:
            hf = hf_dir(str(ckpt))
            if hf is not None:
                from gorilla_dist.model.spec import padded_vocab_size

                handles.append(_Tensors(hf_converted(hf, model, vocab_size, padded_vocab_size(vocab_size))))
                break
            if model is None:
                from gorilla_dist.data.tokenizer import load_tokenizer

                model = OmegaConf.load(ckpt / "config.yaml").model
                tokenizer = ckpt.parent.parent / "tokenizer.json"
                vocab_size = load_tokenizer(tokenizer).vocab_size if tokenizer.is_file() else None
            handles.append(_open(ckpt, WEIGHTS, MODEL, stack))
            ckpt = base_of(ckpt, check=not checked)
        yield _Overlay(handles) if len(handles) > 1 else handles[0]


def _open(ckpt: Path, whole: str, kind: str, stack: ExitStack):
    """A checkpoint's weights or moments as a handle: the consolidated file `whole` when the checkpoint
    has one (every checkpoint before shards, small models since), else its shards of `kind`."""
    if (ckpt / whole).is_file():
        return stack.enter_context(safe_open(str(ckpt / whole), "pt"))
    return ShardedTensors(ckpt, kind)


def weights_source(ckpt: Path) -> str:
    """Where a checkpoint's own weights are read from, for messages."""
    return str(ckpt / WEIGHTS) if (ckpt / WEIGHTS).is_file() else f"{ckpt / SHARDS}/{MODEL}-rank*.safetensors"


@contextmanager
def open_moments(ckpt: Path):
    """A checkpoint's AdamW moments (`<param>.exp_avg` / `.exp_avg_sq`, single-process shapes) as a
    safetensors handle, joined from the shards one tensor at a time."""
    with ExitStack() as stack:
        yield _open(ckpt, MOMENTS, OPTIMIZER, stack)


def checkpoint_moments(ckpt: Path) -> dict[str, torch.Tensor]:
    """All of a checkpoint's AdamW moments (of the trainable parameters only, for an adapter checkpoint)."""
    with open_moments(ckpt) as m:
        return {k: m.get_tensor(k) for k in m.keys()}


def own_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds itself (an adapter checkpoint's trainable ones only: no base)."""
    with ExitStack() as stack:
        w = _open(ckpt, WEIGHTS, MODEL, stack)
        return {k: w.get_tensor(k) for k in w.keys()}


def checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """All of a checkpoint's model weights (an adapter checkpoint's merged onto its base), fp32."""
    with open_weights(ckpt) as w:
        return {k: w.get_tensor(k) for k in w.keys()}


def load_consolidated(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load whole-model weights (a consolidated file's, or checkpoint_weights) into a single-process
    (TP=1) model; every parameter must be there."""
    check_fits(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    load_trained_buffers(model, state.__getitem__)


def resolve_checkpoint(run_dir: str | os.PathLike, which: str = "latest") -> Path:
    """`latest` (newest complete checkpoint of a run) or an explicit checkpoint directory."""
    check_checkpoint_source(run_dir, which)
    if which != "latest":
        ckpt = Path(which)
        problem = verify(ckpt, checksums=True)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is not usable: {problem}")
        return ckpt
    found = newest_usable(Path(run_dir) / "checkpoints", report=True)
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'} (the run has not "
                              "finished a save yet)")
    return found


class Checkpointer:
    def __init__(self, cfg, layout, *, adapter: bool = False):
        """adapter: save the trainable parameters only (fine-tuning with frozen ones), with base.json."""
        self.cfg, self.layout, self.adapter = cfg, layout, adapter
        self.root = Path(cfg.run.dir) / "checkpoints"
        self.interval, self.keep = cfg.checkpoint.interval, cfg.checkpoint.keep
        self.base: dict | None = None  # base_identity of the checkpoint the frozen weights come from

    def due(self, step: int, last: bool) -> bool:
        return last or (self.interval > 0 and step % self.interval == 0)

    def _layout(self) -> dict:
        return {"world": self.layout.world, "tp": self.layout.tp, "pp": self.layout.pp,
                "zero_stage": self.cfg.parallel.zero_stage,
                "device": self.layout.device.type,
                "precision": self.cfg.precision.dtype}

    def save(self, step: int, engine, data_state: dict) -> Path:
        """Collective: every rank calls it and writes its own shards, all at once; nothing is gathered
        (shards.py). Returns the final checkpoint directory. Refuses (on every rank alike, before
        writing anything) a model with inf/NaN weights."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}"
        weights, moments, bad = engine.local_state(trainable_only=self.adapter)
        bad = sorted({name for names in _all_gather(bad) for name in names})
        if bad:
            raise CheckpointError(f"step {step}: the model has non-finite (inf/NaN) weights in {len(bad)} tensors "
                                  f"({', '.join(bad[:3])}); not saving it, the checkpoints in {self.root} are "
                                  "unchanged")
        fault, rank = {"step": step, "rank": self.layout.rank}, self.layout.rank
        if self.layout.is_main:
            if tmp.exists():
                print(f"[checkpoint] removing {tmp}, left by an interrupted save of the same step", file=sys.stderr)
                shutil.rmtree(tmp)
            (tmp / SHARDS).mkdir(parents=True)
        _barrier()
        faults.hit("checkpoint.begin", **fault)
        written = {f"rng_rank{rank:05d}.safetensors": write_tensors(tmp / f"rng_rank{rank:05d}.safetensors",
                                                                    rng_state())}
        written[shard_name(OPTIMIZER, rank)] = write_shard(tmp / shard_name(OPTIMIZER, rank), moments, step)
        if self.layout.is_main:
            trainer = {"step": step, "data": data_state, **engine.schedule_state()}
            (tmp / TRAINER).write_text(json.dumps(trainer, indent=1))
        faults.hit("checkpoint.engine_saved", **fault)
        written[shard_name(MODEL, rank)] = write_shard(tmp / shard_name(MODEL, rank), weights, step)
        del weights, moments
        if self.layout.is_main:
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
            if self.adapter:
                (tmp / BASE).write_text(json.dumps(self.base, indent=1))
        faults.hit("checkpoint.weights_saved", **fault)
        written = {k: v for part in _all_gather(written) for k, v in part.items()}  # (every rank has written)
        if self.layout.is_main:
            model = ShardedTensors(tmp, MODEL)
            if self._consolidate(model):  # one whole tensor at a time, from the shards just written
                written[WEIGHTS] = write_streaming(
                    tmp / WEIGHTS, [(k, torch.float32, tuple(model.get_slice(k).get_shape())) for k in model.keys()],
                    model.get_tensor, {"step": str(step)})
            files = {rel: written.get(rel) or {"size": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file() for rel in [str(f.relative_to(tmp))]}
            manifest = {"step": step, "layout": self._layout(), "files": files}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp / SHARDS)
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

    def _consolidate(self, model: ShardedTensors) -> bool:
        """Whether this save also writes model.safetensors (checkpoint.consolidated; auto: when the
        weights are at most CONSOLIDATE_AUTO_BYTES in fp32)."""
        mode = str(self.cfg.checkpoint.consolidated).lower()
        if mode == "auto":
            numel = sum(math.prod(model.get_slice(k).get_shape()) for k in model.keys())
            return 4 * numel <= CONSOLIDATE_AUTO_BYTES
        return mode == "true"

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
        """Restore the model, optimizer, schedule and RNG from `ckpt`, whatever layout wrote it;
        returns the trainer state (step, data position). Collective."""
        manifest = json.loads((ckpt / "manifest.json").read_text())
        # (checkpoints from before the device was recorded: all written by CPU runs)
        saved, now = {"device": "cpu", "pp": 1, **manifest.get("layout", {})}, self._layout()
        if saved != now and self.layout.is_main:
            print(f"[checkpoint] {ckpt.name} was written with {_describe(saved)}; continuing it with "
                  f"{_describe(now)}", flush=True)
        trainer = json.loads((ckpt / TRAINER).read_text())
        _check_same_sharing(ckpt, self.cfg.model)
        if self.adapter != (ckpt / BASE).is_file():
            raise CheckpointError(f"{ckpt} holds {'the trainable parameters' if (ckpt / BASE).is_file() else 'a whole model'}"
                                  f", but this run has finetune.method={self.cfg.finetune.method}; resume it with the "
                                  "finetune settings it was written with, or start a new run.dir")
        if self.adapter:
            self.base = json.loads((ckpt / BASE).read_text())
        verify_bases(ckpt, self.layout)
        with open_weights(ckpt, checked=True) as w, open_moments(ckpt) as m:
            _check_fits(engine, w, weights_source(ckpt))
            engine.load_full_state(w, m, trainer)
        rng = ckpt / f"rng_rank{self.layout.rank:05d}.safetensors"
        if saved["device"] != now["device"]:  # generator states are device-specific (sizes differ): fresh ones
            if self.layout.is_main:
                print(f"[checkpoint] {ckpt.name} was written on {saved['device']}; its random-number states are not "
                      f"restored on {now['device']} (dropout and sampling draw new numbers from here on)", flush=True)
        elif saved.get("world") == now["world"] and rng.is_file():
            set_rng_state(load_file(str(rng)))
        return trainer

    def init_weights(self, source: str, engine, extra=None) -> Path | str:
        """Fine-tuning start: the model weights of `source` (a checkpoint directory, a run directory's
        newest complete checkpoint, or hf:<transformers directory>) in this run's layout, with fresh
        optimizer moments and schedule. Refuses a source trained with another tokenizer. Collective;
        returns the checkpoint used."""
        run_tokenizer = Path(self.cfg.run.dir) / "tokenizer.json"
        hf = hf_dir(source)
        if hf is not None:
            from gorilla_dist.data.tokenizer import load_tokenizer

            on_main(lambda: check_tokenizer(hf, run_tokenizer), self.layout)
            with open_weights(source, model=self.cfg.model, vocab_size=load_tokenizer(run_tokenizer).vocab_size) as w:
                self._load_initial(w, engine, extra, f"checkpoint.init_from={source}")
            self.base = on_main(lambda: hf_identity(hf), self.layout)  # (hashes the weights: once)
            return source

        def find() -> Path:
            check_init_source(source)
            src = Path(source)
            ckpt = resolve_checkpoint(None, str(src)) if (src / "manifest.json").is_file() else resolve_checkpoint(src)
            theirs, ours = ckpt.parent.parent / "tokenizer.json", Path(self.cfg.run.dir) / "tokenizer.json"
            if theirs.is_file() and not same_tokenizer(theirs, ours):
                raise CheckpointError(f"checkpoint.init_from={source}: its run was trained with another tokenizer "
                                      f"({theirs}) than this run's data ({ours}); the token ids would mean other things")
            return ckpt

        ckpt = on_main(find, self.layout)
        _check_same_sharing(ckpt, self.cfg.model)
        verify_bases(ckpt, self.layout)
        with open_weights(ckpt, checked=True) as w:
            self._load_initial(w, engine, extra, f"checkpoint.init_from: {weights_source(ckpt)}")
        self.base = base_identity(ckpt)
        return ckpt

    @staticmethod
    def _load_initial(w, engine, extra, where: str) -> None:
        if extra is not None:  # values computed from the base's weights (prompt tuning's first prompt)
            w = _Overlay([_Tensors(extra(w)), w])
        # the other adapters this run adds start as built (LoRA's B = 0: the base model exactly)
        have = set(w.keys())  # new adapters and objective heads start as built
        # (single-process names of every pipeline stage's parameters: a collective with stages)
        fresh = frozenset(n for n in model_shapes(engine.module)
                          if (is_adapter(n) or n.startswith(f"{HEADS}.")) and n not in have)
        _check_fits(engine, w, where, fresh=fresh)
        engine.load_full_state(w, _ZeroMoments(w), engine.schedule_state(), fresh=fresh)


def _sharing(model) -> str:
    """A model config's layer sharing, in words ('none' when every layer has its own weights)."""
    m = OmegaConf.create(model)
    sh = m.get("sharing") or {}
    unique = sh.get("unique_layers") or m.num_layers
    if unique == m.num_layers:
        return "none"
    lora = sh.get("lora_rank", 0)
    return (f"unique_layers={unique} pattern={sh.get('pattern', 'cycle_rev')} "
            f"share_norms={str(sh.get('share_norms', True)).lower()}" + (f" lora_rank={lora}" if lora else ""))


def _check_same_sharing(ckpt: Path, model) -> None:
    """A CheckpointError unless `ckpt` was written by a model that shares its layers as `model` does."""
    theirs, ours = _sharing(OmegaConf.load(ckpt / "config.yaml").model), _sharing(model)
    if theirs != ours:
        raise CheckpointError(f"{ckpt} was written by a model with model.sharing {theirs}, this run has {ours}: "
                              "its weight sets would not line up with this model's layers")


def _check_fits(engine, weights, where: str, *, fresh=frozenset()) -> None:
    """The weights file (a safetensors handle) has this model's names and full shapes (but `fresh`)."""
    engine.check_fits({k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}, where, fresh=fresh)


class _Tensors:
    """A dict of tensors with the safetensors-handle interface."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get_slice(self, key: str):
        return _Shape(self.tensors[key].shape)


class _Shape:
    def __init__(self, shape):
        self.shape = list(shape)

    def get_shape(self):
        return self.shape


class _ZeroMoments:
    """Fresh AdamW moments for `<param>.exp_avg` / `.exp_avg_sq`: zeros shaped like the weights."""

    def __init__(self, weights):
        self.weights = weights

    def get_tensor(self, key: str) -> torch.Tensor:
        return torch.zeros(self.weights.get_slice(key.rsplit(".", 1)[0]).get_shape())


def _describe(layout: dict) -> str:
    keys = ("world", "tp", *(("pp",) if layout.get("pp", 1) > 1 else ()), "zero_stage", "precision", "device")
    return " ".join(f"{k}={layout.get(k, '?')}" for k in keys)
