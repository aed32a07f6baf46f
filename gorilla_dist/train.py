"""The training loop: setup builders, `train_step`, `evaluate`, and `train` on one screen."""

from __future__ import annotations

from pathlib import Path

import torch

from gorilla_dist import faults
from gorilla_dist.checkpoint import Checkpointer
from gorilla_dist.config import save_run_config
from gorilla_dist.data.loader import build_data
from gorilla_dist.dtypes import precision_notice
from gorilla_dist.engine import StepResult, TrainEngine, build_engine, partitioned_construction
from gorilla_dist.engine.syncs import LoopSyncs
from gorilla_dist.errors import UserError
from gorilla_dist.finetune import adapter_checkpoints, apply_finetune, check_finetune_data, prompt_init, resolve_labels
from gorilla_dist.inference import caches, sample
from gorilla_dist.loss import class_loss_sum, classified, lm_loss_sum
from gorilla_dist.memory import FirstStepProbe, gather_ranks
from gorilla_dist.metrics import Metrics
from gorilla_dist.model import build_model, flops_per_token
from gorilla_dist.model.head import is_classifier
from gorilla_dist.objectives import objective_options
from gorilla_dist.objectives.mixture import Objectives, build_objectives, evaluation_sums, evaluation_values, head_sizes
from gorilla_dist.parallel import describe_hosts, dp_group, dp_sum, pp_sum
from gorilla_dist.stopping import StopSignals


def train_step(engine: TrainEngine, micro_batches, layout=None, *, objectives: Objectives | None = None,
               poison: bool = False, probe: FirstStepProbe | None = None) -> StepResult:
    """One optimizer step over this rank's micro-batches. DeepSpeed skips the update when the gradient
    norm is inf/NaN (see NonFiniteGuard). `poison` (fault injection, tests): a NaN loss, as from an
    overflow. `probe` measures memory (the first step of a run). `objectives`: the run's mixture (None:
    the language-model loss alone).

    The loss is the mean over every target of the global batch (all micro-batches of all data-parallel
    ranks): DeepSpeed averages gradients over micro-batches and ranks, so each micro-batch's summed loss
    is divided by (global target count) / (dp x micro-batches). Instruction data has a different number
    of targets in each micro-batch; a mean per micro-batch would weigh its tokens unequally, and
    differently for each layout. (With every target counted, as in pretraining, the divisor is the
    micro-batch's own count, exactly.) A classifier's loss is the mean over the global batch's labelled
    examples, the same way; with several objectives, each objective's mean over its own units, weighted
    (gorilla_dist/objectives). StepResult.objectives: this rank's (summed loss, units, correct) of each."""
    dp = layout.dp if layout is not None else 1
    head = is_classifier(engine.module)
    objectives = objectives or PLAIN
    n = dp * len(micro_batches)
    if head:
        counts = torch.stack([classified(b).sum().float() for b in micro_batches]).sum()[None]
    else:
        counts = torch.stack([objectives.units(b) for b in micro_batches]).sum(0)  # (objectives,)
    local = counts.clone()
    if layout is not None:
        counts = dp_sum(counts, layout)
    per_micro = (counts / n).clamp(min=1.0 / n)
    stats = []

    def loss_fn(model, batch):
        if head:
            loss = class_loss_sum(model, batch)[0] / per_micro[0]
        else:
            sums = objectives.sums(model, batch)
            stats.append(sums.detach())
            loss = objectives.loss(sums, per_micro)
        return loss * float("nan") if poison else loss

    result = engine.step(micro_batches, loss_fn, probe=probe)
    if not objectives.plain and not head:
        # (objectives, 2): loss sum, correct; computed on the last pipeline stage, zeros on the others
        summed = torch.stack(stats).sum(0) if stats else local.new_zeros(len(local), 2)
        if layout is not None:
            summed = pp_sum(summed, layout)
        result.objectives = torch.stack([summed[:, 0], local, summed[:, 1]], dim=1)
    return result


@torch.no_grad()
def evaluate(engine, data, n_samples: int, layout, objectives: Objectives | None = None) -> dict[str, float]:
    """Held-out loss over the same n_samples validation samples for every layout (per target, as
    `python -m gorilla_dist.evaluate` computes it); a classifier's per example, and its accuracy. With
    several objectives, every objective scores every validation sample: val_loss stays the language-model
    loss, the others add val_<name>_loss (and val_<name>_accuracy). One host sync."""
    engine.eval()
    batches = data.val_batches(n_samples)
    if is_classifier(engine.module):
        totals = engine.evaluate_sums(batches, class_loss_sum, 3)
        engine.train()
        loss_sum, count, right = dp_sum(totals, layout).tolist()
        return {"val_loss": loss_sum / max(count, 1.0), "val_accuracy": right / max(count, 1.0)}
    if objectives is None or objectives.plain:
        totals = engine.evaluate_sums(batches, lm_loss_sum, 2)
        engine.train()
        loss_sum, count = dp_sum(totals, layout).tolist()
        return {"val_loss": loss_sum / max(count, 1.0)}
    keys, sums = evaluation_sums(engine, data, n_samples, objectives)
    engine.train()
    return evaluation_values(keys, dp_sum(sums, layout).tolist(), objectives.accuracy_keys)


PLAIN = Objectives([objective_options("clm")])


class DivergenceError(UserError):
    pass


class NonFiniteGuard:
    """train.nonfinite: what to do after a step whose loss or gradient norm was inf/NaN. The engine has
    already left the model, the optimizer state and the LR schedule untouched (a NaN loss gives NaN
    gradients, and every optimizer path skips a non-finite norm, see engine/on_device.py), and the norm
    is global, so every rank sees the same verdict.

    The verdicts are read with the losses (Metrics.flush: every train.log_interval steps, and before
    every evaluation and checkpoint), not after each step: reading them would stall the host every
    step. That is safe because a skipped step changes nothing, so the steps between a skip and its
    reading train from the same state as if they had been checked at once, and no checkpoint is
    written before the verdicts of its steps are applied (train.nonfinite=stop leaves the last good
    checkpoint, as before). A diverging run stops at most log_interval - 1 steps later than it would
    have.

    fp16: a skipped step whose loss is finite is a loss-scale overflow (the row's `overflow`): the loss-scaled
    gradients overflowed fp16 and DeepSpeed lowers the scale (halves it; ZeRO's scaler at the second overflow
    in a row), as it does while the scale settles from
    2**precision.initial_scale_power. Those are counted apart (`overflows`) and never stop the run; at the
    scale's floor an overflow counts as any other skip."""

    def __init__(self, t, layout):
        self.policy, self.limit, self.layout = t.nonfinite, t.max_skipped_steps, layout
        self.in_a_row = 0
        self.overflows = 0

    def check(self, step: int, skipped: bool, overflow: bool = False, loss_scale: float | None = None) -> None:
        if overflow:
            self.overflows += 1
            if self.layout.is_main:
                print(f"[train] step {step}: fp16 gradient overflow at loss scale {loss_scale:g}: update skipped, "
                      "the scale is lowered (not counted toward train.max_skipped_steps)", flush=True)
            return
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        what = f"step {step}: the loss or gradient norm is not finite (inf/NaN), the update was not applied"
        if self.policy == "stop":
            raise DivergenceError(f"{what}; stopping (train.nonfinite=stop). Checkpoints hold the model from "
                                  "before; lower optim.lr or raise optim.warmup_steps, or use train.nonfinite=skip")
        if self.in_a_row > self.limit:
            raise DivergenceError(f"{what}, {self.in_a_row} steps in a row (train.max_skipped_steps="
                                  f"{self.limit}): stopping. The model is diverging; resume from a checkpoint "
                                  "with a lower optim.lr")
        if self.layout.is_main:
            print(f"[train] {what}: skipped ({self.in_a_row} in a row)", flush=True)

    def check_rows(self, rows: list[dict]) -> None:
        """Metrics.on_flush: the verdicts of the flushed steps, in order."""
        for row in rows:
            self.check(row["step"], bool(row.get("skipped")), bool(row.get("overflow")), row.get("loss_scale"))


def finish(cfg, metrics: Metrics, layout, *, picture: bool = True, host_syncs: dict | None = None) -> None:
    """Rank 0, at the end of a run or after a stop: run.dir/summary.json, and at the end run.dir/plot.png
    (logging.plot; not after a stop, whose grace period is short). A picture that cannot be drawn is
    reported, never fatal: the run itself is done."""
    if not layout.is_main:
        return
    from gorilla_dist.summary import write_summary

    write_summary(cfg, metrics.wall_s(), host_syncs=host_syncs)
    if cfg.logging.plot and picture:
        from gorilla_dist.errors import UserError
        from gorilla_dist.plot import load_run, plot

        try:
            path = plot([load_run(Path(cfg.run.dir))], Path(cfg.run.dir) / "plot.png")["path"]
            print(f"[train] loss curves: {path}; summary: {Path(cfg.run.dir) / 'summary.json'}", flush=True)
        except UserError as err:
            print(f"[train] no plot: {err}", flush=True)


def train(cfg, layout) -> bool:
    """Train to train.max_steps; False if it stopped early on a signal (after saving a checkpoint)."""
    t = cfg.train
    data = build_data(cfg.data, run=cfg.run, train=cfg.train, seq_length=cfg.model.seq_length, layout=layout)
    check_finetune_data(cfg.finetune, cfg.data, data.datasets)
    before = (list(cfg.finetune.labels), repr(t.objectives))
    resolve_labels(cfg.finetune, data.label_names)  # (checkpoints record the classes)
    objectives = build_objectives(t.objectives, dp_group(layout))
    objectives.resolve(data.label_names)  # options the data gives (classify's classes)
    t.objectives = objectives.configs
    if layout.is_main and before != (list(cfg.finetune.labels), repr(t.objectives)):
        save_run_config(cfg, cfg.run.dir)  # run.dir/config.yaml names the classes too, as the checkpoints do
    for note in data.notes if layout.is_main else ():
        print(f"[data] {note}", flush=True)
    hosts = describe_hosts(layout) if layout.is_main else None
    if hosts:
        print(f"[parallel] {hosts}", flush=True)
    notice = precision_notice(cfg.precision.dtype, layout.device) if layout.is_main else None
    if notice:
        print(notice, flush=True)
    model = build_model(cfg.model, vocab_size=data.vocab_size, dtype=cfg.precision.dtype, device=layout.device,
                        seed=cfg.run.seed, parallel=cfg.parallel, finetune=cfg.finetune,
                        heads=head_sizes(t.objectives, len(data.datasets)),
                        construct=partitioned_construction(cfg.model, cfg.parallel, cfg.precision))
    tuned = apply_finetune(model, cfg.finetune)
    if tuned and layout.is_main:
        print(f"[finetune] {tuned}", flush=True)
    if t.compile:
        model.compile()  # in place: parameter names (checkpoints, consolidation) stay unchanged
    engine = build_engine(model, optim=cfg.optim, train=cfg.train, parallel=cfg.parallel,
                          precision=cfg.precision, layout=layout)
    ckpt = Checkpointer(cfg, layout, adapter=adapter_checkpoints(cfg.finetune))

    step = 0
    resume_from = ckpt.find_resume()
    if resume_from is not None:
        state = ckpt.load(resume_from, engine)
        step = int(state["step"])
        data.load_state_dict(state["data"])
        if layout.is_main:
            print(f"[train] resumed from {resume_from} at step {step}", flush=True)
    elif cfg.checkpoint.init_from:
        source = ckpt.init_weights(cfg.checkpoint.init_from, engine,
                                   extra=prompt_init(cfg.finetune, data.tokenizer, cfg.run.seed))
        if layout.is_main:
            print(f"[train] weights from {source}; optimizer, LR schedule and data order start fresh", flush=True)

    guard, signals = NonFiniteGuard(t, layout), StopSignals(layout, every=t.log_interval)
    metrics = Metrics(cfg, layout, flops_per_token=flops_per_token(cfg.model, data.vocab_size),
                      tokens_per_step=t.global_batch_size * cfg.model.seq_length, start_step=step,
                      router_stats=engine.router_stats, on_flush=guard.check_rows)
    metrics.memory("start", step, gather_ranks(engine.state_bytes(), layout))
    probe = FirstStepProbe(engine, layout.device)
    syncs = LoopSyncs(cfg.logging.count_syncs, step)
    stopping = False
    def eval_due(s: int) -> bool:
        return bool(t.eval_interval) and (s % t.eval_interval == 0 or s == t.max_steps)

    while step < t.max_steps and not stopping:
        n = step + 1
        quiet = n % t.log_interval and n != t.max_steps and not ckpt.due(n, False) and not eval_due(n)
        with syncs.counting(n, quiet):  # logging.count_syncs: the host syncs of quiet steps (none expected)
            lr = engine.lr  # the rate this step uses (the schedule advances inside the step)
            result = train_step(engine, data.next_train_batches(), layout, objectives=objectives,
                                poison=faults.hit("loss", step=n, rank=layout.rank), probe=probe)
            step = n
            if probe is not None:
                metrics.memory("first_step", step, gather_ranks(probe.result(), layout))
                probe = None
            # read every log_interval steps (and then the guard)
            metrics.step(step, result.loss, lr, result.grad_norm, skipped=result.skipped, moe=result.moe,
                         objectives=result.objectives, loss_scale=result.loss_scale)
            faults.hit("step", step=step, rank=layout.rank)
            last = step == t.max_steps
            stopping = signals.agreed(step, last)  # asks the other ranks every log_interval steps
        if eval_due(step):
            with metrics.paused("eval"):
                values = evaluate(engine, data, t.eval_samples, layout, objectives)
            metrics.eval(step, values)
        if ckpt.due(step, last) or stopping:
            with metrics.paused("checkpoint"):
                ckpt.save(step, engine, data.state_dict())
    if stopping:
        signals.saved()
        metrics.close()
        finish(cfg, metrics, layout, picture=False)
        if layout.is_main:
            cause = signals.received or "a peer rank's signal"
            print(f"[train] stopped at step {step} on {cause}; "
                  "the checkpoint is saved, a restart resumes from it", flush=True)
        signals.close()
        return False
    signals.close()
    metrics.close()
    finish(cfg, metrics, layout, host_syncs=syncs.report())

    if t.sample_tokens and cfg.finetune.head == "none":
        text = sample(engine.sampling_model(), data.tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                      seq_length=cfg.model.seq_length, seed=cfg.run.seed,
                      cache=caches(cfg.model) and not cfg.parallel.sequence_parallel and layout.pp == 1)
        if layout.is_main:
            print(f"\n--- sample ({t.sample_tokens} tokens) ---\n{text}\n---", flush=True)
    return True
