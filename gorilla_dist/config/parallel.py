"""parallel: how the ranks split the work (tensor, expert, data parallel; ZeRO; recompute; devices) and the
process-group timeouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gorilla_dist.config.checks import choice, positive
from gorilla_dist.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PP_SCHEDULES = ("1f1b", "interleaved")
RECOMPUTE = {"none": {},
             # megatron-core's selective recompute: the core attention (scores, softmax) of every layer
             "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
             # every layer: only its input is kept; the layer runs again in the backward
             "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
"""parallel.activation_checkpointing: each choice and the megatron-core TransformerConfig fields it sets."""


@dataclass
class ParallelConfig:
    device: str = "auto"
    """auto (a GPU per rank when torch sees one, else the CPU) | cpu (even on a GPU machine) | cuda (refused
    where there is none). With a GPU, rank i of a node uses GPU i: at most as many ranks per node as GPUs."""
    tp: int = 1
    """Tensor-parallel size (megatron-core column/row parallel layers). Data parallel = world / tp
    (ParallelDims.dp)."""
    pp: int = 1
    """Pipeline-parallel size: the decoder layers are split into `pp` consecutive stages, one per rank of a
    pipeline (the first also holds the embeddings, the last the final norm, output layer and loss); each
    step's micro-batches flow through them in a 1F1B or interleaved schedule (pp_schedule, engine/pipeline.py).
    Data parallel = world / (tp * pp)."""
    pp_layers: Optional[list[int]] = None
    """Decoder layers per pipeline stage, e.g. [1, 3] (uneven splits; they must sum to model.num_layers,
    each >= 1); with pp_virtual > 1, per virtual stage (pp * pp_virtual entries, in the order the layers run).
    None: as even as possible, the extra layers on the middle stages first (the first and last stages also
    hold the embeddings and the output layer)."""
    pp_schedule: str = "1f1b"
    """1f1b (PipeDream-Flush: a stage holds one run of consecutive layers) | interleaved (megatron-core's
    virtual pipeline: each rank holds pp_virtual chunks of non-adjacent layers, chunk c of rank r being virtual
    stage c * pp + r, and runs the micro-batches in groups of pp through its chunks in turn: the pipeline
    bubble shrinks by a factor pp_virtual for pp_virtual times more exchanges; the micro-batches per step must
    be a multiple of pp)."""
    pp_virtual: int = 1
    """Model chunks per pipeline rank for pp_schedule=interleaved (>= 2; 1 with 1f1b)."""
    ep: int = 1
    """Expert-parallel size (model.moe): each MoE layer's experts are split over `ep` ranks of a
    data-parallel group, which exchange tokens; expert weights are then reduced and partitioned over the
    world / (tp * ep) ranks holding the same experts. Must divide the data-parallel size and
    model.moe.num_experts."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 over the data-parallel group: 1 partitions the optimizer state (and
    the fp32 master weights), 2 also the gradients, 3 also the parameters."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1): norms, dropout and residuals run on 1/tp of the
    sequence per rank, dividing their activation memory by tp."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward instead of keeping them: none | selective (each layer's
    core attention) | full (each layer keeps only its input)."""
    timeout_s: float = 600.0
    """A collective (all-reduce, broadcast, barrier) that does not complete within this many seconds
    ends the job with a message naming the rank and the operation, instead of hanging forever."""
    census_grace_s: float = 10.0
    """After a collective failed, each survivor asks the others through the rendezvous store whether they are
    alive and waits this long for answers, to name the ranks and hosts that are gone (exit 69)."""
    rendezvous_timeout_s: float = 300.0
    """At start, rank 0 waits this long for every rank to join, the others this long to reach rank 0's
    address (MASTER_ADDR, or the first node of a Slurm job); then the job ends with a message naming the
    address and the ranks missing."""
    socket_ifname: str | None = None
    """Network interface the ranks talk over (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), e.g. ib0 or eth0,
    when the host name resolves to the wrong one; a comma-separated list is allowed. None: the address
    the host name resolves to (gloo), NCCL's own choice."""


def world_size(cfg) -> int:
    """Ranks the launch starts (all nodes)."""
    nodes = {"slurm": cfg.slurm.nodes, "torchrun": cfg.launch.nnodes}.get(cfg.launch.backend, 1)
    return int(cfg.launch.nproc_per_node) * int(nodes)


def possible_world_sizes(cfg) -> list[int]:
    """Every world size the run may start with: with slurm.min_nodes, one per node count in the range."""
    if cfg.launch.backend != "slurm" or cfg.slurm.min_nodes is None:
        return [world_size(cfg)]
    return [int(cfg.launch.nproc_per_node) * n for n in range(cfg.slurm.min_nodes, cfg.slurm.nodes + 1)]


def world_source(cfg, world: int | None = None) -> str:
    """Where a world size comes from, for messages: 'slurm.nodes(2) * launch.nproc_per_node(4)'."""
    if cfg.launch.backend == "slurm":
        nodes = world // cfg.launch.nproc_per_node if world is not None else cfg.slurm.nodes
        count = (f"slurm.nodes({nodes})" if nodes == cfg.slurm.nodes
                 else f"{nodes} node{'s' if nodes > 1 else ''} (slurm.min_nodes={cfg.slurm.min_nodes})")
        return f"{count} * launch.nproc_per_node({cfg.launch.nproc_per_node})"
    if cfg.launch.backend == "torchrun" and cfg.launch.nnodes > 1:
        return f"launch.nnodes({cfg.launch.nnodes}) * launch.nproc_per_node({cfg.launch.nproc_per_node})"
    return "launch.nproc_per_node"


@dataclass(frozen=True)
class ParallelDims:
    """Every parallel size of a run, computed once from the world size and the parallel section and checked
    once (torchtitan's ParallelDims); config validation, the launcher, process-group set-up, the engine, the
    data sharding and the checkpoints read it, and no other code derives a size from the world size.

    The ranks are laid out world = dp * pp * cp * tp, tensor parallel innermost (a node's ranks share its
    fast links). Experts: each MoE layer's experts are split over `ep` ranks of a data-parallel group, and
    the `expert_dp` = dp / ep ranks that hold the same experts reduce (and ZeRO-partition) their gradients
    together. cp (context parallel) is 1 until it is built: a larger value is refused here, with the reason."""

    world: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @classmethod
    def build(cls, world: int, *, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
              source: str | None = None) -> ParallelDims:
        """The sizes for `world` ranks, or one ConfigError naming the sizes that do not fit; `source`: where
        the world size came from ('launch.nproc_per_node'), named in that error."""
        for key, value in (("parallel.tp", tp), ("parallel.ep", ep), ("world size", world)):
            if value < 1:
                raise ConfigError(f"{key}={value} must be > 0")
        if pp < 1:
            raise ConfigError(f"parallel.pp={pp} must be > 0")
        if cp != 1:
            raise ConfigError(f"cp={cp}: context parallelism is not built yet; only cp=1 runs")
        where = f"world size {world}" + (f" ({source})" if source else "")
        if world % (tp * pp * cp):
            sizes = f"parallel.tp({tp})" + (f" * parallel.pp({pp}) = {tp * pp}" if pp > 1 else "")
            raise ConfigError(f"{where} is not divisible by {sizes}")
        dims = cls(world=world, tp=tp, pp=pp, cp=cp, ep=ep)
        if dims.dp % ep:
            raise ConfigError(f"parallel.ep={ep} must divide the data-parallel size {dims.dp} (world {world} / "
                              f"parallel.tp {tp}{f' / parallel.pp {pp}' if pp > 1 else ''}): each expert-parallel group is ep ranks of one tensor-parallel "
                              "position")
        return dims

    @classmethod
    def from_config(cls, cfg, world: int | None = None) -> ParallelDims:
        """The run's sizes at `world` ranks (None: the ranks the launch starts, world_size)."""
        world = world_size(cfg) if world is None else world
        p = cfg.parallel
        return cls.build(world, tp=p.tp, pp=p.pp, ep=p.ep, source=world_source(cfg, world))

    @property
    def dp(self) -> int:
        """Data-parallel size: the copies of the model, each fed its own share of the global batch."""
        return self.world // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (their data-parallel group)."""
        return self.dp // self.ep

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model between them (tp * pp * cp)."""
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        """'world 4 = dp 2 x tp 2' (sizes above 1 only; ep as 'ep 2 of dp')."""
        parts = [f"{k} {v}" for k, v in (("dp", self.dp), ("pp", self.pp), ("cp", self.cp), ("tp", self.tp)) if v > 1]
        ep = f", experts over ep {self.ep} of dp" if self.ep > 1 else ""
        return f"world {self.world} = {' x '.join(parts) or '1'}{ep}"


def pipeline_split(num_layers: int, pp: int, pp_layers: list[int] | None = None, virtual: int = 1) -> list[int]:
    """Decoder layers per pipeline stage (with `virtual` chunks per rank: per virtual stage, pp * virtual of
    them, virtual stage c * pp + r being chunk c of rank r): `pp_layers` when given (checked), else as even as
    possible with the extra layers on the middle stages first, then the first stage (the last holds the
    output layer and the loss). One stage: [num_layers]."""
    stages = pp * virtual
    what = (f"parallel.pp={pp}" if virtual == 1 else f"parallel.pp={pp} x parallel.pp_virtual={virtual} = {stages}")
    if pp_layers:
        if len(pp_layers) != stages:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)} has {len(pp_layers)} entries; {what} needs one per "
                              f"{'virtual ' if virtual > 1 else ''}pipeline stage")
        if min(pp_layers) < 1:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)}: every stage needs at least one decoder layer")
        if sum(pp_layers) != num_layers:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)} sums to {sum(pp_layers)} layers, but "
                              f"model.num_layers={num_layers}")
        return [int(n) for n in pp_layers]
    if stages > num_layers:
        limit = (f"set parallel.pp <= {num_layers}" if virtual == 1
                 else f"set parallel.pp * parallel.pp_virtual <= {num_layers}")
        raise ConfigError(f"{what} {'virtual ' if virtual > 1 else ''}pipeline stages for model.num_layers="
                          f"{num_layers}: each stage needs at least one decoder layer; {limit}")
    base, extra = divmod(num_layers, stages)
    order = [*range(1, stages - 1), 0, stages - 1]  # who gets an extra layer first
    counts = [base] * stages
    for stage in order[:extra]:
        counts[stage] += 1
    return counts


def stage_chunks(num_layers: int, pp: int, rank: int, pp_layers: list[int] | None = None,
                 virtual: int = 1) -> list[range]:
    """The global indices of the decoder layers pipeline rank `rank` holds, one range per model chunk (one chunk
    without interleaving; chunk c is virtual stage c * pp + rank)."""
    counts = pipeline_split(num_layers, pp, pp_layers, virtual)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    return [range(starts[s], starts[s] + counts[s]) for s in range(rank, pp * virtual, pp)]


def check_parallel(p) -> None:
    """parallel: sizes, choices and timeouts (how the sizes fit the world: ParallelDims)."""
    for key in ("tp", "pp", "timeout_s", "rendezvous_timeout_s", "census_grace_s"):
        positive(getattr(p, key), f"parallel.{key}")
    choice(p.zero_stage, (0, 1, 2, 3), "parallel.zero_stage")
    choice(p.activation_checkpointing, RECOMPUTE, "parallel.activation_checkpointing")
    choice(p.device, DEVICES, "parallel.device")
    choice(p.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    positive(p.pp_virtual, "parallel.pp_virtual")
    if p.pp_schedule == "interleaved" and (p.pp == 1 or p.pp_virtual < 2):
        raise ConfigError(f"parallel.pp_schedule=interleaved with parallel.pp={p.pp} and parallel.pp_virtual={p.pp_virtual}: "
                          "the interleaved schedule runs pp_virtual >= 2 model chunks on each of pp >= 2 pipeline ranks; "
                          "set both, or parallel.pp_schedule=1f1b")
    if p.pp_schedule == "1f1b" and p.pp_virtual != 1:
        raise ConfigError(f"parallel.pp_virtual={p.pp_virtual} with parallel.pp_schedule=1f1b: model chunks per rank "
                          "are for the interleaved schedule; set parallel.pp_schedule=interleaved or parallel.pp_virtual=1")
    if p.pp_layers is not None and p.pp == 1 and len(p.pp_layers) != 1:
        raise ConfigError(f"parallel.pp_layers={list(p.pp_layers)} splits the layers over {len(p.pp_layers)} stages, "
                          f"but parallel.pp=1; set parallel.pp={len(p.pp_layers)}")
    if p.pp > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} with parallel.pp={p.pp}: ZeRO-2/3 partition the "
                          "gradients, which a pipeline stage accumulates over the micro-batches of its schedule (each "
                          "would be reduced and partitioned once per micro-batch); use parallel.zero_stage=0 or 1 "
                          "(ZeRO-1 partitions the optimizer state over the data-parallel ranks of each stage)")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true splits the sequence over the tensor-parallel ranks, "
                          "but parallel.tp=1; set parallel.tp > 1 or parallel.sequence_parallel=false")
