"""Typed configuration: a module per section (its dataclass and its checks), registered with Hydra's
ConfigStore as one schema.

The launcher composes these with the YAML groups in `conf/` and CLI overrides (struct mode: a typo'd
key is an error), calls `validate()` once, and writes the resolved config to `run.dir/config.yaml`.
Workers read only that file (`load_run_config`). Nothing here imports anything heavy: the launcher
uses it without importing torch or model code.

    run.py        RunConfig
    model.py      ModelConfig (SparseConfig, SharingConfig, MoEConfig), layer_weight_sets, moe_layers
    parallel.py   ParallelConfig and ParallelDims: every parallel size, computed once from the world size
    precision.py  PrecisionConfig          optim.py    OptimConfig
    train.py      TrainConfig, grad_accum_steps (each objective's options: gorilla_dist/objectives/)
    data.py       DataConfig, SourceConfig checkpoint.py  CheckpointConfig and the checks of what tools read
    finetune.py   FinetuneConfig, LoraConfig
    logging.py    LoggingConfig, WandbConfig
    launch.py     LaunchConfig, SlurmConfig and what goes into a Slurm job script

A new section: its module (a dataclass with a docstring under every field, and a `check_<section>` raising
ConfigError that names the key, the value and what would be valid), a field of Config, a call in validate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from gorilla_dist.config.checkpoint import (CheckpointConfig, check_checkpoint, check_checkpoint_source,
                                            check_init_source, has_checkpoints)
from gorilla_dist.config.checks import choice, positive
from gorilla_dist.config.data import SAMPLE_BY, DataConfig, SourceConfig, check_data
from gorilla_dist.config.finetune import (FINETUNE_HEADS, FINETUNE_METHODS, LORA_TARGETS, FinetuneConfig, LoraConfig,
                                          check_finetune)
from gorilla_dist.config.launch import (BACKENDS, SLURM_SHAPES, LaunchConfig, SlurmConfig, check_launch,
                                        check_min_nodes, check_slurm_value, slurm_job_name)
from gorilla_dist.config.logging import WANDB_MODES, LoggingConfig, WandbConfig, check_logging
from gorilla_dist.config.model import (ACTIVATIONS, MOE_DISPATCHERS, MOE_ROUTERS, NORMALIZATIONS, POSITIONS,
                                       SHARING_PATTERNS, ModelConfig, MoEConfig, SharingConfig,
                                       SparseConfig, check_model, layer_weight_sets, moe_layers)
from gorilla_dist.config.optim import SCHEDULES, OptimConfig, check_optim
from gorilla_dist.config.parallel import (DEVICES, RECOMPUTE, ParallelConfig, ParallelDims, check_parallel,
                                          pipeline_split, possible_world_sizes, world_size, world_source)
from gorilla_dist.config.precision import PRECISIONS, PrecisionConfig, check_precision
from gorilla_dist.config.run import RunConfig
from gorilla_dist.config.train import NONFINITE, TrainConfig, check_batch, check_train, grad_accum_steps
from gorilla_dist.errors import ConfigError
from gorilla_dist.files import write_text_atomic
from gorilla_dist.hf_import import PREFIX as HF_PREFIX
from gorilla_dist.kernels.limits import UnsupportedAttention
from gorilla_dist.kernels.registry import attention_kernel
from gorilla_dist.hf_import import hf_dir, max_positions, model_fields, read_config
from gorilla_dist.objectives import check_objectives, objective_class, parse_objective


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def validate(cfg, world: int | None = None) -> ParallelDims:
    """Check that the config is consistent (types, ranges, choices, how the sections fit together), before
    any process starts and wherever a run's config is read again, section by section. Raises ConfigError
    naming the key, the value and what would be valid. Looks at no file: see check_inputs. Returns the
    parallel sizes at `world` ranks (None: the launcher's, checked at every world size the run may start
    with, slurm.min_nodes)."""
    if world is None:
        check_min_nodes(cfg)
        for other in possible_world_sizes(cfg)[:-1]:
            validate(cfg, other)
        world = world_size(cfg)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    check_parallel(p)
    check_train(t, cfg.data, cfg.finetune)
    check_launch(cfg, world)
    check_optim(cfg.optim)
    check_checkpoint(cfg.checkpoint)
    check_precision(cfg.precision)
    check_logging(cfg.logging)
    check_data(cfg.data, t)
    check_finetune(cfg.finetune, cfg.checkpoint, m, p, cfg.data)
    check_model(m, p, cfg.data, cfg.precision.dtype)
    check_pipeline(cfg)
    dims = ParallelDims.from_config(cfg, world)
    at_world = f" (at world size {world}: {world_source(cfg, world)})" if cfg.slurm.min_nodes is not None else ""
    check_batch(t, dims.dp, at_world)
    micro_batches = grad_accum_steps(t, dims.dp)
    if p.pp_schedule == "interleaved" and micro_batches % p.pp:
        raise ConfigError(f"parallel.pp_schedule=interleaved runs the micro-batches in groups of parallel.pp={p.pp}, "
                          f"but a step has {micro_batches} per rank (train.global_batch_size={t.global_batch_size} / "
                          f"(train.micro_batch_size={t.micro_batch_size} x data-parallel {dims.dp})){at_world}; "
                          f"make it a multiple of {p.pp}")
    return dims


def check_pipeline(cfg) -> None:
    """parallel.pp > 1: the layer split fits the model, and the options a pipeline stage does not run yet are
    refused, each with its reason."""
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return
    pipeline_split(m.num_layers, p.pp, list(p.pp_layers) if p.pp_layers else None, p.pp_virtual)
    with_pp = f"with parallel.pp={p.pp}"
    refusals = [
        (m.sharing.unique_layers not in (None, m.num_layers),
         f"model.sharing.unique_layers={m.sharing.unique_layers} {with_pp}: layers sharing weights across "
         "pipeline stages are not built yet; use parallel.pp=1"),
        (cfg.finetune.method in ("prompt", "prefix"),
         f"finetune.method={cfg.finetune.method} {with_pp}: virtual tokens change what the stages exchange; "
         "not built yet; use lora, full or freeze, or parallel.pp=1"),
    ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(why)


def check_inputs(cfg) -> None:
    """The inputs a training run reads exist: data.path, data.tokenizer (a file), data.sources,
    checkpoint.resume (a directory). Run by the launcher and by each worker before training; not by
    generate, evaluate or export, which need only the run's own files (its config, tokenizer and
    checkpoints), so they keep working after a run's data was moved or deleted. checkpoint.init_from is
    checked where it is used (a run's first start only)."""
    d = cfg.data
    if d.path is not None and not Path(d.path).is_file():
        raise ConfigError(f"data.path={d.path!r}: no such file")
    tok = d.tokenizer
    if tok not in ("char", "byte") and not tok.startswith("bpe:") and not Path(tok).exists():
        raise ConfigError(f"data.tokenizer={tok!r}: expected char, byte, bpe:<vocab_size>, or the path of a "
                          "Hugging Face tokenizer.json (or its directory)")
    for i, src in enumerate(d.sources):
        if not Path(src.path).is_dir():
            raise ConfigError(f"data.sources[{i}].path={src.path!r}: no such directory (prepare one with "
                              "python -m gorilla_dist.data.prepare input=... output=...)")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError(f"checkpoint.resume={resume!r}: expected auto, never, or an existing checkpoint directory")


def check_before_start(cfg) -> None:
    """What the launcher can know before it writes into run.dir or starts a process: run.dir is a directory
    (or new), checkpoint.resume=never meets no checkpoints, checkpoint.init_from holds one (first start
    only), and the GPU-only options meet a GPU (on this machine, or slurm.gpus_per_node for a job)."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={cfg.run.dir!r} is a file; a run directory (new or existing) is expected")
    started = has_checkpoints(run_dir)
    if cfg.checkpoint.resume == "never" and started:
        raise ConfigError(f"checkpoint.resume=never but {run_dir / 'checkpoints'} already holds checkpoints; use a "
                          "new run.dir or checkpoint.resume=auto (nothing was changed)")
    source = cfg.checkpoint.init_from
    if source is not None and hf_dir(source) is None and not started:  # a restart resumes its own checkpoints
        check_init_source(source)
    if cfg.launch.backend == "slurm":
        gpus, where = cfg.slurm.gpus_per_node, f"the job asks for slurm.gpus_per_node={cfg.slurm.gpus_per_node}"
    else:
        from gorilla_dist.runtime import visible_gpus

        gpus, where = visible_gpus(), "this machine has no GPU visible (no /dev/nvidiaN, or CUDA_VISIBLE_DEVICES)"
    device = cfg.parallel.device
    if device == "cpu":
        gpus, where = 0, "parallel.device=cpu"
    elif device == "cuda" and not gpus:
        raise ConfigError(f"parallel.device=cuda but {where}; use parallel.device=cpu or auto")
    per_node = cfg.launch.nproc_per_node
    if gpus and per_node > gpus:  # rank i of a node takes GPU i
        raise ConfigError(f"launch.nproc_per_node={per_node} ranks per node, but "
                          + (f"slurm.gpus_per_node={gpus}" if cfg.launch.backend == "slurm" else
                             f"this machine has {gpus} GPU{'s' if gpus > 1 else ''} visible")
                          + f": each rank needs its own GPU; set launch.nproc_per_node<={gpus}, or parallel.device=cpu")
    if cfg.launch.backend == "slurm" and gpus and per_node < gpus and not cfg.slurm.idle_gpus:
        raise ConfigError(f"launch.nproc_per_node={per_node} ranks per node, but slurm.gpus_per_node={gpus}: "
                          f"{gpus - per_node} allocated GPU{'s' if gpus - per_node > 1 else ''} per node would stay "
                          f"idle; set launch.nproc_per_node={gpus} (one rank per GPU), or slurm.idle_gpus=true")
    if not gpus and cfg.precision.dtype == "fp16":
        raise ConfigError(f"precision.dtype=fp16 needs a GPU (DeepSpeed has fp16 training on GPUs only) and {where}; "
                          "use precision=bf16 or precision=fp32")
    try:  # what the attention kernel needs of the machine (flash: flash-attn and a GPU)
        attention_kernel(cfg.model.attention).check_start(gpus, where)
    except UnsupportedAttention as err:
        raise ConfigError(str(err)) from None


def resolve(cfg) -> None:
    """Fill derived values (so run.dir/config.yaml holds concrete numbers) and make every path
    absolute against the directory the user launched from."""
    if cfg.train.micro_batch_size is None:
        try:
            dp = ParallelDims.from_config(cfg).dp
        except ConfigError:  # sizes that do not fit: validate names them (after the checks that come first)
            dp = 1
        cfg.train.micro_batch_size = max(1, cfg.train.global_batch_size // dp)
    try:  # each objective's options in full (its defaults too), as its own dataclass has them
        cfg.train.objectives = [OmegaConf.structured(o) for o in check_objectives(cfg.train.objectives, cfg.data,
                                                                                   cfg.finetune)]
    except ConfigError:  # validate names it
        pass
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    if cfg.data.path is not None:
        cfg.data.path = os.path.abspath(cfg.data.path)
    for src in cfg.data.sources:
        src.path = os.path.abspath(src.path)
    if Path(cfg.data.tokenizer).exists():
        cfg.data.tokenizer = os.path.abspath(cfg.data.tokenizer)
    if cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = os.path.abspath(cfg.checkpoint.resume)
    hf = hf_dir(cfg.checkpoint.init_from)
    if hf is not None:  # a transformers model: its architecture becomes ours (hf_import.py)
        cfg.checkpoint.init_from = f"{HF_PREFIX}{os.path.abspath(hf)}"
        hf_config = read_config(Path(os.path.abspath(hf)))
        fields = model_fields(hf_config, str(hf))
        limit = max_positions(hf_config)
        if limit is not None and cfg.model.seq_length > limit:
            raise ConfigError(f"model.seq_length={cfg.model.seq_length}: hf:{hf} has learned positions for {limit} "
                              "tokens; set model.seq_length <= that")
        cfg.model = OmegaConf.merge(cfg.model, {"name": f"hf:{Path(hf).name}", **fields})
    elif cfg.checkpoint.init_from is not None:
        cfg.checkpoint.init_from = os.path.abspath(cfg.checkpoint.init_from)
    if cfg.run.name is None:
        cfg.run.name = os.path.basename(cfg.run.dir)


def save_run_config(cfg, run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, OmegaConf.to_yaml(cfg))
    return path


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a launcher wrote, checked against the schema, validated, as typed objects."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.yaml; start runs with `python -m launcher run.dir={run_dir}`")
    return parse_run_config(path.read_text(), str(path))


OLD_OBJECTIVE_FIELDS = ("target", "labels", "temperature", "projection", "mode", "mean_span", "rate", "mask", "replace",
                        "delete")
"""The options every train.objectives entry carried before each objective had its own (ignored where they did
not apply): dropped from an older run's config where they are not the objective's."""


def parse_run_config(text: str, where: str) -> Config:
    """A resolved config's YAML (run.dir/config.yaml, a checkpoint's, a consolidated file's metadata),
    checked against the schema (an unknown key or a wrong type is an error), validated, and returned as
    the schema's dataclasses: code past this point holds plain typed objects (cfg.model is a ModelConfig),
    never an OmegaConf node."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.create(text)
        if "vocab_size" in raw.get("model", {}):  # written by runs before the vocabulary came from the tokenizer
            del raw.model["vocab_size"]
        if "eval_batches" in raw.get("train", {}):  # written by runs before evaluation counted samples
            del raw.train["eval_batches"]
        for o in raw.get("train", {}).get("objectives", []):  # written by runs before each objective had its own
            own = {f.name for f in fields(objective_class(o.name).Options)} if o.get("name") else set()  # options
            for key in [k for k in OLD_OBJECTIVE_FIELDS if k in o and k not in own]:
                del o[key]
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except (OmegaConfBaseException, ValueError) as err:  # a hand-edited file: unknown key, wrong type, bad YAML
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None
    validate(cfg)
    out = OmegaConf.to_object(cfg)
    out.train.objectives = [parse_objective(o, f"train.objectives[{i}]") for i, o in enumerate(out.train.objectives)]
    return out


__all__ = ["ACTIVATIONS", "BACKENDS", "CheckpointConfig", "Config", "ConfigError",
           "DEVICES", "DataConfig", "FINETUNE_HEADS", "FINETUNE_METHODS", "FinetuneConfig",
           "LORA_TARGETS", "LaunchConfig", "LoggingConfig", "LoraConfig", "MOE_DISPATCHERS", "MOE_ROUTERS",
           "MoEConfig", "ModelConfig", "NONFINITE", "NORMALIZATIONS", "OptimConfig",
           "POSITIONS", "PRECISIONS", "ParallelConfig", "ParallelDims", "PrecisionConfig", "RECOMPUTE", "RunConfig",
           "SAMPLE_BY", "SCHEDULES", "SHARING_PATTERNS", "SLURM_SHAPES", "SharingConfig",
           "SlurmConfig", "SourceConfig", "SparseConfig", "TrainConfig", "WANDB_MODES", "WandbConfig", "check_batch",
           "check_before_start", "check_checkpoint", "check_checkpoint_source", "check_data", "check_finetune",
           "check_init_source", "check_inputs", "check_launch", "check_logging", "check_min_nodes", "check_model",
           "check_optim", "check_parallel", "check_precision", "check_slurm_value", "check_train", "choice",
           "grad_accum_steps", "has_checkpoints", "layer_weight_sets", "load_run_config", "moe_layers",
           "parse_run_config", "positive", "possible_world_sizes", "register_configs", "resolve", "save_run_config",
           "slurm_job_name", "validate", "world_size", "world_source"]
