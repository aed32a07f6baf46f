"""The loop talks to the TrainEngine protocol (engine/protocol.py), not to DeepSpeed: the DeepSpeed engine is
one implementation, and a second one written here (plain torch AdamW, the same parameter groups, schedule and
clipping, no DeepSpeed) takes train.train_step's steps and gives the same losses and weights."""

import pytest
import torch

from gorilla_dist.engine import StepResult, TrainEngine
from gorilla_dist.engine.deepspeed_engine import DeepSpeedEngine
from gorilla_dist.model import build_model
from gorilla_dist.optim import lr_at, param_groups
from gorilla_dist.train import train_step
from test_nonfinite import batch, make_engine


class TorchEngine:
    """A TrainEngine of one process without DeepSpeed: what the loop needs, and nothing else."""

    router_stats = None

    def __init__(self, model, optim, train):
        self.module, self.optim, self.train_cfg = model, optim, train
        self.optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                           betas=(optim.beta1, optim.beta2), eps=optim.eps)
        self.global_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    @property
    def lr(self):
        return torch.tensor(lr_at(self.global_steps, self.optim, self.train_cfg.max_steps))

    skipped_steps = 0

    def step(self, micro_batches, loss_fn, *, probe=None):
        total = torch.zeros(())
        for b in micro_batches:
            loss = loss_fn(self, b) / len(micro_batches)  # DeepSpeed averages over micro-batches too
            loss.backward()
            total += loss.detach() * len(micro_batches)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return StepResult(loss=total / len(micro_batches), grad_norm=norm, skipped=torch.tensor(False))

    def evaluate_sums(self, batches, fn, width):
        return torch.stack([torch.stack(fn(self, b)) for b in batches]).sum(0)

    def sampling_model(self):
        return self.module

    def full_state(self, *, keep=True, trainable_only=False):
        return {k: v.detach().clone() for k, v in self.module.state_dict().items() if "_extra_state" not in k}, {}, []

    def local_state(self, *, trainable_only=False):
        return self.full_state()

    def schedule_state(self):
        return {"global_steps": self.global_steps}

    def load_full_state(self, weights, moments, schedule, *, fresh=frozenset()):
        self.module.load_state_dict(weights, strict=False)

    def optimizer_step_count(self):
        return self.global_steps

    def check_fits(self, shapes, source, *, fresh=frozenset()):
        pass

    def state_bytes(self):
        return {"params": sum(p.numel() * p.element_size() for p in self.module.parameters())}


def test_the_deepspeed_engine_is_a_train_engine(world1):
    engine, _ = make_engine(world1, "fp32", 0)
    assert isinstance(engine, DeepSpeedEngine) and isinstance(engine, TrainEngine)
    assert not isinstance(object(), TrainEngine)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_step_runs_on_another_engine_with_the_same_numbers(world1, accumulate):
    reference, cfg = make_engine(world1, "fp32", 0)
    cfg.train.global_batch_size = 2 * accumulate
    if accumulate > 1:
        from test_nonfinite import engine_for

        reference = engine_for(cfg, world1)
    model = build_model(cfg.model, vocab_size=16, dtype="fp32", device=world1.device, seed=1)
    other = TorchEngine(model, cfg.optim, cfg.train)
    assert isinstance(other, TrainEngine)
    for step in range(4):
        micro = [batch(step * accumulate + i) for i in range(accumulate)]
        want, got = train_step(reference, micro, world1), train_step(other, micro, world1)
        assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-5, abs=1e-6)
        assert float(got.grad_norm) == pytest.approx(float(want.grad_norm), rel=1e-4)
    mine, theirs = other.full_state()[0], reference.full_state()[0]
    assert set(theirs) <= set(mine)
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
