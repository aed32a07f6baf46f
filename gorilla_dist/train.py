"""The training loop: setup builders, `train_step`, `evaluate`, and `train` on one screen."""

from __future__ import annotations

import torch
from omegaconf import open_dict

from gorilla_dist.checkpoint import Checkpointer
from gorilla_dist.data.loader import build_data
from gorilla_dist.generate import sample
from gorilla_dist.metrics import Metrics
from gorilla_dist.model import build_model, flops_per_token
from gorilla_dist.optim import build_engine
from gorilla_dist.parallel import dp_mean


def lm_loss(model, batch) -> torch.Tensor:
    """Next-token cross entropy averaged over the batch's unmasked targets (see data.loader.Batch)."""
    per_token = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels)  # (b, s)
    mask = batch.loss_mask
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


def train_step(engine, micro_batches) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the mean loss (not synced)."""
    total = torch.zeros((), device=micro_batches[0].tokens.device)
    for batch in micro_batches:
        loss = lm_loss(engine, batch)
        engine.backward(loss)  # DeepSpeed divides by the accumulation count
        engine.step()  # updates only at the accumulation boundary
        total += loss.detach().float()
    return total / len(micro_batches)


@torch.no_grad()
def evaluate(engine, data, n_batches: int, layout) -> float:
    engine.eval()
    losses = torch.stack([lm_loss(engine, batch) for batch in data.val_batches(n_batches)]).mean()
    engine.train()
    return dp_mean(losses, layout).item()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train(cfg, layout) -> None:
    t = cfg.train
    data = build_data(cfg, layout)
    with open_dict(cfg):
        cfg.model.vocab_size = data.vocab_size
    model = build_model(cfg.model, dtype=cfg.precision.dtype, device=layout.device, seed=cfg.run.seed)
    if t.compile:
        model.compile()  # in place: parameter names (checkpoints, consolidation) stay unchanged
    engine = build_engine(model, cfg, layout)
    ckpt = Checkpointer(cfg, layout)

    step = 0
    resume_from = ckpt.find_resume()
    if resume_from is not None:
        state = ckpt.load(resume_from, engine)
        step = int(state["step"])
        data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        if layout.is_main:
            print(f"[train] resumed from {resume_from} at step {step}", flush=True)

    metrics = Metrics(cfg, layout, flops_per_token=flops_per_token(cfg.model),
                      tokens_per_step=t.global_batch_size * cfg.model.seq_length, start_step=step)
    while step < t.max_steps:
        lr = engine.get_lr()[0]  # the rate this step uses (the schedule advances inside the step)
        loss = train_step(engine, data.next_train_batches())
        step += 1
        metrics.step(step, loss, lr, engine.get_global_grad_norm())
        last = step == t.max_steps
        if t.eval_interval and (step % t.eval_interval == 0 or last):
            with metrics.paused():
                val_loss = evaluate(engine, data, t.eval_batches, layout)
            metrics.eval(step, val_loss)
        if ckpt.due(step, last):
            with metrics.paused():
                ckpt.save(step, engine, {"step": step, "data": data.state_dict(), "rng": rng_state()})
    metrics.close()

    if t.sample_tokens:
        text = sample(engine.module, data.tokenizer, t.sample_prompt, max_new_tokens=t.sample_tokens,
                      seq_length=cfg.model.seq_length, seed=cfg.run.seed)
        if layout.is_main:
            print(f"\n--- sample ({t.sample_tokens} tokens) ---\n{text}\n---", flush=True)
