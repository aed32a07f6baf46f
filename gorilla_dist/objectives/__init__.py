"""Pretraining objectives mixed by ratio (train.objectives).

Every training sample gets one objective: the loader assigns them per global batch with the data blend's
rule (data/order.py Blend: every window of samples follows the weights within one sample, independent of
the data-parallel size; its counters are part of the loader state, so a resumed run continues the same
sequence). Each objective sums its loss over its own samples and counts its units (target tokens,
samples); the step's loss is

    sum over objectives o of  weight_o * (sum_o / count_o)

with count_o the global batch's count (all micro-batches, all data-parallel ranks) — the same
normalisation the language-model loss has always had (train.train_step), so clm alone is exactly the
loss it was before objectives existed.

    clm       next-token cross entropy on the sample's targets (loss.per_token_loss)
    classify  which data.sources entry the sample comes from: the mean of its final-normed hidden states
              over its scored positions, through a bias-free linear head (`objective_heads.classify`,
              an auxiliary parameter: checkpointed like any other, left out by export)

Evaluation scores every objective on every validation sample: `val_loss` stays the language-model loss
(comparable with a clm-only run), and each other objective adds its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gorilla_dist.loss import per_token_loss
from gorilla_dist.model.head import HEADS, pooled_scores


@dataclass(frozen=True)
class Objective:
    name: str
    weight: float  # normalised over the objectives
    index: int     # its id in Batch.objective


class Objectives:
    """The run's objectives (from train.objectives) and how a micro-batch's loss is made of them."""

    def __init__(self, configs):
        total = sum(c.weight for c in configs)
        self.items = [Objective(c.name, c.weight / total, i) for i, c in enumerate(configs)]
        self.weights = [o.weight for o in self.items]
        self.names = [o.name for o in self.items]
        self.plain = self.names == ["clm"]  # the language-model loss alone, exactly as before objectives

    def needs_hidden(self) -> bool:
        return any(o.name != "clm" for o in self.items)

    def rows(self, batch, o: Objective) -> torch.Tensor:
        """(b,) bool: the micro-batch's samples with objective o."""
        if batch.objective is None:
            return torch.ones(batch.tokens.shape[0], dtype=torch.bool, device=batch.tokens.device)
        return batch.objective == o.index

    def units(self, batch) -> torch.Tensor:
        """(objectives,) float: what each objective's loss averages over, in this micro-batch."""
        out = []
        for o in self.items:
            rows = self.rows(batch, o)
            out.append(batch.loss_mask[rows].sum() if o.name == "clm" else rows.sum().float())
        return torch.stack(out)

    def sums(self, model, batch) -> torch.Tensor:
        """(objectives, 2) float32: each objective's summed loss (with gradient) and its correct
        predictions (classify; 0 for clm), over its samples in this micro-batch. One forward."""
        losses = per_token_loss(model, batch).float()  # (b, s)
        out = []
        for o in self.items:
            rows = self.rows(batch, o).float()
            if o.name == "clm":
                mask = batch.loss_mask if self.plain else batch.loss_mask * rows[:, None]
                out.append(torch.stack([(losses * mask).sum(), losses.new_zeros(())]))
            else:  # classify: the sample's source
                scores = classify_scores(model, batch)  # (b, sources)
                ce = F.cross_entropy(scores, batch.source, reduction="none")
                right = (scores.argmax(-1) == batch.source).float()
                out.append(torch.stack([(ce * rows).sum(), (right * rows).sum().detach()]))
        return torch.stack(out)

    def loss(self, sums: torch.Tensor, per_micro: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step loss: sum_o weight_o * sums_o / per_micro_o, where
        per_micro_o = global count_o / (dp * micro-batches) (DeepSpeed averages the gradients)."""
        if self.plain:
            return sums[0, 0] / per_micro[0]
        return sum(o.weight * sums[o.index, 0] / per_micro[o.index] for o in self.items)


def classify_scores(model, batch) -> torch.Tensor:
    """(b, sources) scores of the classify head, pooled over each sample's scored positions (after the
    forward: model/head.py keeps the per-position scores)."""
    module = model.module if hasattr(model, "module") else model
    return pooled_scores(module, "classify", batch.loss_mask)


def build_objectives(configs) -> Objectives:
    return Objectives(configs)


def head_sizes(configs, n_sources: int) -> dict[str, int]:
    """The auxiliary heads the objectives need ({name: classes}) for a run with n_sources data sources."""
    return {"classify": n_sources} if any(c.name == "classify" for c in configs) else {}


__all__ = ["HEADS", "Objective", "Objectives", "build_objectives", "classify_scores", "head_sizes"]
