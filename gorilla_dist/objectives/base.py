"""The plug-in interface of a pretraining objective (train.objectives): what the config check, the loader, the
loss, evaluation, metrics and the heads ask an objective, so that none of them tests its name.

An objective is a class with a `name`, its own options dataclass (`Options`: `name` and `weight`, then only
its own fields, each with a docstring) and the hooks below; an instance is the objective at its place in the
run's mixture (its options, its index, its normalised weight). Everything here is torch-free at import (the
launcher checks options without torch): hooks that compute import torch inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from omegaconf import MISSING

from gorilla_dist.errors import ConfigError


@dataclass
class ObjectiveOptions:
    """What every objective takes; an objective's Options subclass adds its own fields."""

    name: str = MISSING
    """The objective (a registered name: clm, classify, contrastive, denoise, permute, or a plug-in's)."""
    weight: float = 1.0
    """This objective's share of every window of samples and of the loss (normalised over objectives)."""


class Objective:
    """A pretraining objective. Subclass it, set `name` and `Options`, override the hooks it needs, and
    register it (objectives.register_objective, or the `gorilla_dist.objectives` entry point group)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = ObjectiveOptions

    token_loss: ClassVar[bool] = False
    """Its loss is the next-token loss on the sample's targets (Batch.loss_mask): units are target tokens,
    and the one per-token loss of the forward is shared with the other such objectives."""
    input_to_target: ClassVar[bool] = False
    """It rewrites a sample into input + target (`corrupt`), with the objectives' special tokens (data
    prepared with special_tokens=objectives)."""
    own_view: ClassVar[bool] = False
    """Evaluation scores it on its own view of the validation samples (`corrupt` or `view` applied to all of
    them); otherwise on the samples as they are."""
    accuracy: ClassVar[bool] = False
    """It counts correct predictions: metrics log accuracy_<key>, evaluation val_<key>_accuracy."""
    pairs_across_ranks: ClassVar[bool] = False
    """Its loss pairs samples across the data-parallel ranks (contrastive negatives): micro-batch i of every
    rank is then the i-th consecutive part of the global batch, so the pairs do not depend on the layout."""

    def __init__(self, options, index: int = 0, weight: float = 1.0):
        self.options, self.index, self.weight = options, index, weight

    # ---- the config (torch-free) ----

    @classmethod
    def check(cls, o, where: str, data, finetune) -> None:
        """Raise ConfigError naming `where` (train.objectives[i]) and the option when `o` is not valid for
        this run (data, finetune: those config sections)."""

    @classmethod
    def label(cls, o) -> str:
        """How the config check names it (two objectives with one label are refused)."""
        return cls.name

    @classmethod
    def key_of(cls, o) -> str:
        """Its name in metrics (loss_<key>, val_<key>_loss)."""
        return cls.name

    @property
    def key(self) -> str:
        return self.key_of(self.options)

    def head_size(self, n_sources: int) -> int | None:
        """Width of its auxiliary head on the final hidden states (objective_heads.<name>); None: none."""
        return None

    def resolve(self, where: str, label_names: list[str] | None) -> None:
        """Fill options that come from the data (the labels' classes) when the run starts."""

    def sample_options(self) -> None:
        """Options for building the model's names only (finetune.check: no data yet)."""

    # ---- the data (numpy, in the loader) ----

    def corrupt(self, loader, windows, valid, segments, targets, rows, keys) -> None:
        """input_to_target: in place, rows (bool) of the packed windows become input + target (see
        objectives/denoise.corrupt_rows for the arrays); keys: each row's seed."""
        raise NotImplementedError

    def view(self, batch, rows, eod: int):
        """The batch with rows (bool) prepared for this objective after packing (contrastive halves); the
        default leaves it as it is."""
        return batch

    # ---- the loss (torch) ----

    def units(self, batch, rows):
        """0-d float: what its loss averages over in this micro-batch: by default its samples."""
        return rows.sum().float()

    def sums(self, model, batch, rows, losses, group):
        """(summed loss with its gradient, correct predictions) over its samples `rows` of this micro-batch;
        `losses` (b, s): the forward's per-token loss; `group`: the data-parallel group (pairs_across_ranks)."""
        raise NotImplementedError


def positive_number(value, key: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value} must be positive")
