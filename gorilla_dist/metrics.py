"""Metrics sinks on rank 0: `run.dir/metrics.jsonl`, W&B (offline by default) and a progress bar.

The trainer hands over per-step tensors (loss, learning rate, gradient norm, skipped) without reading
them; `flush()` turns the pending steps into numbers with one host read per `train.log_interval` steps
(and before an evaluation or a checkpoint), so logging costs no per-step sync. `on_flush(rows)` sees
the numbers first (the non-finite policy, train.NonFiniteGuard).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gorilla_dist.files import write_text_atomic
from gorilla_dist.parallel import dp_mean, dp_sum

MIN_LOSS_SCALE = 1.0
"""DeepSpeed's floor for the dynamic fp16 loss scale (min_loss_scale, default 1): an overflow there is the
model's, not the scale's."""
# Dense peak TFLOP/s per device, by precision, for MFU. CPU peaks differ per machine: pass
# logging.peak_tflops (e.g. measured with benchmarks/) to get MFU there.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def peak_flops(cfg, device: torch.device) -> float | None:
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS.items():
            if key in name:
                return table[cfg.precision.dtype] * 1e12
    return None


def truncate_after(path: Path, step: int) -> None:
    """Keep only lines with step <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def wandb_row(row: dict) -> dict:
    """A metrics.jsonl row as W&B scalars: the expert-load matrix becomes moe_load/layer<i>/expert<j>."""
    out = {k: v for k, v in row.items() if k not in ("step", "moe_load") and v is not None}
    for i, load in enumerate(row.get("moe_load", [])):
        out.update({f"moe_load/layer{i}/expert{j}": x for j, x in enumerate(load)})
    return out


class Metrics:
    def __init__(self, cfg, layout, *, flops_per_token: float, tokens_per_step: int, start_step: int,
                 router_stats=None, on_flush=None):
        self.cfg, self.layout = cfg, layout
        self.on_flush = on_flush  # called with every flushed step's row, on every rank
        self.router_stats = router_stats  # engine.moe.RouterStats of an MoE model, else None
        self.moe_pending: list[torch.Tensor] = []
        from gorilla_dist.objectives import bind

        bound = bind(cfg.train.objectives)
        self.objective_names = [o.key for o in bound]
        self.objective_accuracy = {o.key for o in bound if o.accuracy}
        self.objective_pending: list[torch.Tensor] = []
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(cfg, layout.device)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.last_time, self.last_step = time.perf_counter(), start_step
        from gorilla_dist.summary import process_age

        self.created, self.startup, self.spent = self.last_time, process_age(), {}
        self.main = layout.is_main
        if not self.main:
            return
        self.path = Path(cfg.run.dir) / "metrics.jsonl"
        truncate_after(self.path, start_step)
        self.file = self.path.open("a")
        self.wandb = self._init_wandb()
        self.bar = None
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc=cfg.run.name)
        # start-up: process start to the first step (imports, data check, model, engine, resume)
        (self.bar.write if self.bar is not None else print)(f"[train] start-up {self.startup:.1f} s")
        if self.wandb is not None:
            self.wandb.summary["startup_s"] = self.startup

    def _init_wandb(self):
        mode = self.cfg.logging.wandb.mode
        if mode == "disabled":
            return None
        import wandb

        id_file = Path(self.cfg.run.dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        from omegaconf import OmegaConf

        # silent: W&B's own ~30 lines at the end (history sparklines, summary) repeat what the run printed;
        # close() names where the run's files are instead
        return wandb.init(mode=mode, project=self.cfg.logging.wandb.project, entity=self.cfg.logging.wandb.entity,
                          name=self.cfg.run.name, id=run_id, resume="allow", dir=self.cfg.run.dir,
                          config=OmegaConf.to_container(OmegaConf.create(self.cfg), resolve=True),
                          settings=wandb.Settings(silent=True))

    def step(self, step: int, loss: torch.Tensor, lr, grad_norm, *, skipped=False,
             moe: torch.Tensor | None = None, objectives: torch.Tensor | None = None,
             loss_scale: float | None = None) -> None:
        """Record a step; none of the tensors is read here. `loss`: this rank's mean loss; `lr`, `grad_norm`
        (None: not measured), `skipped` (the update was not applied: non-finite loss or gradient norm):
        tensors or numbers; `moe`: the routers' numbers (StepResult.moe); `objectives`: each objective's
        (loss sum, units, correct) on this rank (StepResult.objectives); `loss_scale`: fp16's (a host number).
        A skipped fp16 step whose loss is finite is a loss-scale overflow (the row says `overflow`): the scaled
        gradients overflowed and DeepSpeed lowered the scale, the model is fine (train.NonFiniteGuard)."""
        device = loss.device
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device).detach().reshape(())  # noqa: E731
        norm = None if grad_norm is None else as_tensor(grad_norm)
        self.pending.append((step, loss.detach().float(), as_tensor(lr), norm, as_tensor(skipped), loss_scale))
        if moe is not None:
            self.moe_pending.append(moe)
        if objectives is not None:
            self.objective_pending.append(objectives)
        if step % self.cfg.train.log_interval == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        losses = dp_mean(torch.stack([p[1] for p in self.pending]), self.layout)
        nan = torch.full((), float("nan"), device=losses.device)
        moe = self._moe_numbers()
        objectives = None
        if self.objective_pending:  # (steps, objectives, 3) summed over the data-parallel ranks
            objectives = dp_sum(torch.stack(self.objective_pending).double(), self.layout).tolist()
            self.objective_pending = []
        # (steps, 4): loss, lr, grad norm (NaN: none), skipped -- the one host read per interval
        table = torch.stack([losses, torch.stack([p[2] for p in self.pending]),
                             torch.stack([nan if p[3] is None else p[3] for p in self.pending]),
                             torch.stack([p[4] for p in self.pending])], dim=1).tolist()
        now = time.perf_counter()
        steps = self.pending[-1][0] - self.last_step
        tokens_per_s = steps * self.tokens_per_step / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, self.pending[-1][0]
        rows = []
        for pending, (loss, lr, grad_norm, skipped) in zip(self.pending, table):
            row = {"step": pending[0], "loss": loss, "lr": lr,
                   "grad_norm": None if pending[3] is None else grad_norm, "tokens_per_s": tokens_per_s}
            if pending[5] is not None:
                row["loss_scale"] = pending[5]
            if skipped:
                row["skipped"] = True
                if grad_norm < 0:  # DeepSpeed's ZeRO norms report a non-finite group as -1
                    row["grad_norm"] = float("inf")
                if pending[5] is not None and pending[5] > MIN_LOSS_SCALE and math.isfinite(loss):
                    row["overflow"] = True
            if self.peak:
                row["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.layout.world)
            rows.append(row)
        if objectives is not None:
            for row, per_objective in zip(rows, objectives):
                for name, (loss_sum, units, right) in zip(self.objective_names, per_objective):
                    row[f"loss_{name}"] = loss_sum / max(units, 1.0)
                    row[f"units_{name}"] = int(units)
                    if name in self.objective_accuracy:
                        row[f"accuracy_{name}"] = right / max(units, 1.0)
        if moe is not None:
            for i, row in enumerate(rows):
                row.update({name: v[i] for name, v in moe["per_step"].items()})
            rows[-1].update(moe["interval"])
        self.pending.clear()
        self._write(rows)
        if self.main and self.bar is not None:
            post = {"loss": f"{rows[-1]['loss']:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if "mfu" in rows[-1]:
                post["mfu"] = f"{rows[-1]['mfu']:.1%}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(rows[-1]["step"] - self.bar.n)  # one redraw per interval
        if self.on_flush is not None:
            self.on_flush(rows)

    def _moe_numbers(self) -> dict | None:
        """The routers' numbers of the pending steps summed over every rank (one all-reduce), as metrics."""
        if not self.moe_pending:
            return None
        summed = torch.stack(self.moe_pending).float()
        self.moe_pending = []
        if torch.distributed.is_initialized() and self.layout.world > 1:
            torch.distributed.all_reduce(summed)
        return self.router_stats.summarize(summed.cpu(), self.layout.dp)  # read with the losses, in one drain

    @contextmanager
    def paused(self, kind: str):
        """Work that is not training (kind: eval, checkpoint) is kept out of tokens/s, and timed."""
        self.flush()
        start = time.perf_counter()
        yield
        self.last_time = time.perf_counter()
        self.spent[kind] = self.spent.get(kind, 0.0) + self.last_time - start

    def wall_s(self) -> dict[str, float]:
        """This session's wall time: start-up (process start to the first step), training, eval,
        checkpoint, total."""
        since = time.perf_counter() - self.created
        other = sum(self.spent.values())
        return {"startup": self.startup, "training": since - other, "eval": self.spent.get("eval", 0.0),
                "checkpoint": self.spent.get("checkpoint", 0.0), "total": self.startup + since}

    def eval(self, step: int, values: dict[str, float]) -> None:
        """values: val_loss, and a classifier's val_accuracy."""
        self._write([{"step": step, **values}])
        if self.main:
            msg = f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items())
            (self.bar.write if self.bar is not None else print)(msg)

    def memory(self, when: str, step: int, per_rank: list[dict[str, int]]) -> None:
        """Per-rank bytes (gorilla_dist.memory) at `when` (start | first_step): one metrics.jsonl row
        {"step", "memory": when, "ranks": [...]}, W&B memory/<when>/<kind> (the largest rank), and a
        printed table."""
        if not self.main:
            return
        from gorilla_dist.memory import describe

        row = {"step": step, "memory": when, "ranks": per_rank}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({f"memory/{when}/{k}": max(r[k] for r in per_rank) for k in per_rank[0]}, step=step)
        msg = f"[memory] {when.replace('_', ' ')} (step {step}), per rank:\n{describe(per_rank)}"
        (self.bar.write if self.bar is not None else print)(msg)

    def _write(self, rows: list[dict]) -> None:
        if not self.main:
            return
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log(wandb_row(row), step=row["step"])
        self.file.flush()

    def close(self) -> None:
        self.flush()
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            where, offline = self.wandb.dir, self.cfg.logging.wandb.mode == "offline"
            self.wandb.finish()
            run_files = Path(where).parent
            print(f"[wandb] {'offline ' if offline else ''}run {run_files}" +
                  (f"; upload it with: wandb sync {run_files}" if offline else ""), flush=True)
