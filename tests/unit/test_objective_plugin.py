"""A pretraining objective added from outside the package (editing no package file): `ReversedText`, defined
here, is the next-token loss on each sample read backwards. It is registered in-process for the unit checks,
and as an installed package's entry point (group gorilla_dist.objectives, a dist-info written by the test)
for a run started by the real launcher, whose config check, loader, loss, metrics and evaluation then use it
by its name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gorilla_dist.errors import ConfigError
from gorilla_dist.objectives import OBJECTIVES, Objective, ObjectiveOptions


@dataclass
class ReversedOptions(ObjectiveOptions):
    keep_first: int = 0
    """Tokens at the start of each sample left in place (the rest is read backwards)."""


class ReversedText(Objective):
    name = "reversed"
    Options = ReversedOptions
    token_loss = True
    own_view = True

    @classmethod
    def check(cls, o, where, data, finetune):
        if o.keep_first < 0:
            raise ConfigError(f"{where}.keep_first={o.keep_first} must be >= 0")
        if data.reset_at_eod:
            raise ConfigError(f"{where}: reversed reads a sample backwards, which data.reset_at_eod's documents "
                              "would not survive")

    def view(self, batch, rows, eod):
        import torch

        k = self.options.keep_first
        window = torch.cat([batch.tokens, batch.labels[:, -1:]], dim=1)  # (b, s + 1)
        flipped = torch.cat([window[:, :k], window[:, k:].flip(1)], dim=1)
        rows = torch.as_tensor(rows)
        window = torch.where(rows[:, None], flipped, window)
        batch.tokens, batch.labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        batch.doc_lengths = None  # the documents' order changed
        return batch

    def units(self, batch, rows):
        return (batch.loss_mask * rows[:, None]).sum()

    def sums(self, model, batch, rows, losses, group):
        return (losses * batch.loss_mask * rows[:, None]).sum(), losses.new_zeros(())


@pytest.fixture
def registered():
    from helpers import registered_for_a_test

    yield from registered_for_a_test(OBJECTIVES, ReversedText)


def test_the_objective_trains_through_the_mixture(world1, registered):
    """In-process: registered, it is parsed, checked, and its loss is the language-model loss of the reversed
    samples (the reference: the same model on batches reversed by hand)."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from gorilla_dist.config import Config
    from gorilla_dist.loss import lm_loss_sum
    from gorilla_dist.objectives import check_objectives, objective_options
    from gorilla_dist.objectives.mixture import Objectives
    from test_nonfinite import batch, make_engine

    cfg = OmegaConf.structured(Config)
    assert check_objectives([{"name": "reversed", "keep_first": 2}], cfg.data, cfg.finetune)[0].keep_first == 2
    with pytest.raises(ConfigError, match=r"train.objectives\[0\]: reversed has no option 'keepfirst'"):
        check_objectives([{"name": "reversed", "keepfirst": 2}], cfg.data, cfg.finetune)
    cfg.data.reset_at_eod = True
    with pytest.raises(ConfigError, match="reset_at_eod"):
        check_objectives([{"name": "reversed"}], cfg.data, cfg.finetune)

    engine, _ = make_engine(world1, "fp32", 0)
    mixture = Objectives([objective_options("reversed")])
    b = batch(3)
    reference = batch(3)
    window = torch.cat([reference.tokens, reference.labels[:, -1:]], 1).flip(1)
    reference.tokens, reference.labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    mine = mixture.items[0].view(b, np.ones(2, dtype=bool), eod=15)
    with torch.no_grad():
        got = mixture.sums(engine, mine)[0, 0]
        want = lm_loss_sum(engine, reference)[0]
        plain = lm_loss_sum(engine, batch(3))[0]
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert abs(float(got) - float(plain)) > 1e-3  # reading backwards is another loss


def test_an_installed_objective_trains_through_the_launcher(tmp_path):
    from helpers import check, installed_plugin, launch, metrics

    env = installed_plugin(tmp_path, "gorilla_dist.objectives", "reversed", "test_objective_plugin:ReversedText")
    run = tmp_path / "run"
    out = check(launch(run, "train.max_steps=6", "train.eval_interval=6", "train.eval_samples=24",
                       "train.objectives=[{name: clm, weight: 1}, {name: reversed, weight: 1, keep_first: 1}]",
                       env=env))
    rows = metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert steps and all(r["units_reversed"] > 0 for r in steps) and "loss_reversed" in steps[-1]
    evals = [r for r in rows if "val_loss" in r]
    assert evals and "val_reversed_loss" in evals[-1], out[-2000:]
    saved = (run / "config.yaml").read_text()
    assert "keep_first: 1" in saved  # the run records the plug-in's options in full
    # without the plug-in installed, the name is refused before anything starts, naming the choices
    bad = launch(tmp_path / "other", "train.objectives=[{name: reversed}]")
    assert bad.returncode == 2 and "train.objectives[0].name='reversed' is not valid; choose one of: clm" in bad.stdout
    assert not (tmp_path / "other" / "config.yaml").exists()
