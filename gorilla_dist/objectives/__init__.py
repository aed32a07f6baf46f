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
              an auxiliary parameter: checkpointed like any other, left out by export); or (target=label)
              each example's prepare-time `label`, from the head's score at its last prompt token
              (Batch.classes, the position finetune.head=classification reads), per labelled example
    contrastive  the loader splits the longest document of the sample into two halves (`contrastive_view`:
              segment ids keep each half attending to itself only; Batch.spans marks them); each half's
              mean hidden state goes through a linear projection (`objective_heads.contrastive`) and is
              normalised; InfoNCE with temperature tau matches every first half with its own second half
              among the second halves of all contrastive samples of the micro-batch on every data-parallel
              rank (gathered with their gradients, so 2 ranks compute what 1 process does)
    denoise   the loader corrupts the sample with UL2's denoiser `mode` (objectives/denoise.py: input
              bidirectional, target causal); the loss is the next-token loss on the target
    permute   likewise, BART's sentence permutation: the shuffled sentences and <|sep|> as input, the
              original as target

Evaluation scores every objective on every validation sample: `val_loss` stays the language-model loss
(comparable with a clm-only run), and each other objective adds its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gorilla_dist.errors import ConfigError
from gorilla_dist.loss import per_token_loss
from gorilla_dist.model.head import HEADS, pooled_scores


LM = ("clm", "denoise", "permute")
"""Objectives whose loss is the next-token loss on the sample's targets (loss_mask)."""


@dataclass(frozen=True)
class Objective:
    name: str
    weight: float  # normalised over the objectives
    index: int     # its id in Batch.objective
    key: str       # its name in metrics: the name, or denoise_<mode>


def objective_key(c) -> str:
    return f"denoise_{c.mode}" if c.name == "denoise" else c.name


class Objectives:
    """The run's objectives (from train.objectives) and how a micro-batch's loss is made of them."""

    def __init__(self, configs, dp_group=None):
        """dp_group: the data-parallel process group contrastive negatives are gathered over (None: this
        process only)."""
        total = sum(c.weight for c in configs)
        self.configs = list(configs)
        self.items = [Objective(c.name, c.weight / total, i, objective_key(c)) for i, c in enumerate(configs)]
        self.dp_group = dp_group
        self.names = [o.name for o in self.items]
        self.keys = [o.key for o in self.items]
        self.plain = self.names == ["clm"]  # the language-model loss alone, exactly as before objectives

    def rows(self, batch, o: Objective) -> torch.Tensor:
        """(b,) bool: the micro-batch's samples with objective o (validation: every scored sample)."""
        if batch.objective is None:
            if batch.scored is not None:
                return batch.scored
            return torch.ones(batch.tokens.shape[0], dtype=torch.bool, device=batch.tokens.device)
        return batch.objective == o.index

    def by_label(self, o: Objective) -> bool:
        return o.name == "classify" and self.configs[o.index].target == "label"

    def units(self, batch) -> torch.Tensor:
        """(objectives,) float: what each objective's loss averages over, in this micro-batch: target
        tokens, samples, or (classify target=label) labelled examples."""
        out = []
        for o in self.items:
            rows = self.rows(batch, o)
            if o.name in LM:
                out.append((batch.loss_mask * rows[:, None]).sum())  # (a boolean index would read the device)
            elif self.by_label(o):
                out.append(labelled(batch, rows).sum().float())
            else:
                out.append(rows.sum().float())
        return torch.stack(out)

    def sums(self, model, batch) -> torch.Tensor:
        """(objectives, 2) float32: each objective's summed loss (with gradient) and its correct
        predictions (classify, contrastive; 0 for the others), over its samples in this micro-batch. One
        forward."""
        losses = per_token_loss(model, batch).float()  # (b, s)
        out = []
        for o in self.items:
            rows = self.rows(batch, o)
            if o.name in LM:  # next-token loss on the targets (denoise: its target part)
                mask = batch.loss_mask if self.plain else batch.loss_mask * rows[:, None].float()
                out.append(torch.stack([(losses * mask).sum(), losses.new_zeros(())]))
            elif o.name == "contrastive":
                ce, right = contrastive_sums(model, batch, rows, self.configs[o.index].temperature, self.dp_group)
                out.append(torch.stack([ce, right]))
            elif self.by_label(o):  # classify: each labelled example's class, at its last prompt token
                at = labelled(batch, rows)
                scores = _module(model).objective_scores["classify"].float()
                scores = scores[:, scores.shape[1] - at.shape[1]:][at]  # (n, classes)
                labels = batch.classes[at]
                out.append(torch.stack([F.cross_entropy(scores, labels, reduction="sum"),
                                        (scores.argmax(-1) == labels).sum().float().detach()]))
            else:  # classify: the sample's source
                scores = classify_scores(model, batch)  # (b, sources)
                ce = F.cross_entropy(scores, batch.source, reduction="none")
                right = (scores.argmax(-1) == batch.source).float()
                w = rows.float()
                out.append(torch.stack([(ce * w).sum(), (right * w).sum().detach()]))
        return torch.stack(out)

    def loss(self, sums: torch.Tensor, per_micro: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step loss: sum_o weight_o * sums_o / per_micro_o, where
        per_micro_o = global count_o / (dp * micro-batches) (DeepSpeed averages the gradients)."""
        if self.plain:
            return sums[0, 0] / per_micro[0]
        return sum(o.weight * sums[o.index, 0] / per_micro[o.index] for o in self.items)


def labelled(batch, rows: torch.Tensor) -> torch.Tensor:
    """(b, s) bool: the positions of `rows` where a labelled example's class is read (Batch.classes)."""
    if batch.classes is None:
        return torch.zeros_like(batch.loss_mask, dtype=torch.bool)
    return (batch.classes >= 0) & rows[:, None]


def resolve_labels(configs, label_names: list[str] | None) -> None:
    """classify target=label: fill its `labels` from the data's classes (checkpoints record them), or refuse
    data without labels, or with other classes than the config names."""
    for i, c in enumerate(configs):
        if c.name != "classify" or c.target != "label":
            continue
        if label_names is None:
            raise ConfigError(f"train.objectives[{i}]: classify with target: label needs labelled data: rows with a "
                              "'label' field, prepared with python -m gorilla_dist.data.prepare ... format=instruction "
                              "(train_on_inputs=true to keep the language-model loss on the text)")
        if c.labels and list(c.labels) != label_names:
            raise ConfigError(f"train.objectives[{i}].labels={list(c.labels)} but the data's classes are {label_names} "
                              "(in id order)")
        c.labels = list(label_names)


def _module(model) -> torch.nn.Module:
    """The model itself, under train.TrainEngine or not."""
    return model.module if hasattr(model, "module") else model


def classify_scores(model, batch) -> torch.Tensor:
    """(b, sources) scores of the classify head, pooled over each sample's scored positions (after the
    forward: model/head.py keeps the per-position scores)."""
    return pooled_scores(_module(model), "classify", batch.loss_mask)


def contrastive_sums(model, batch, rows: torch.Tensor, temperature: float, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed InfoNCE loss over this rank's contrastive samples `rows`, how many rank their own second
    half first), the negatives gathered over `group` with their gradients."""
    module = _module(model)
    spans = batch.spans if batch.spans is not None else torch.zeros_like(batch.tokens, dtype=torch.int8)  # (none here:
    # the gather below still runs, every rank takes part in it)
    first = F.normalize(pooled_scores(module, "contrastive", (spans == 1).float())[rows], dim=-1)
    second = F.normalize(pooled_scores(module, "contrastive", (spans == 2).float())[rows], dim=-1)
    offset, every = 0, second
    if group is not None and torch.distributed.get_world_size(group) > 1:
        from torch.distributed.nn.functional import all_gather

        n = torch.tensor([second.shape[0]], device=second.device)
        counts = [torch.zeros_like(n) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(counts, n, group=group)
        counts = [int(c) for c in counts]
        padded = F.pad(second, (0, 0, 0, max(counts) - second.shape[0]))
        parts = all_gather(padded, group=group)  # differentiable: each rank's gradient goes back to its owner
        every = torch.cat([p[:c] for p, c in zip(parts, counts)])
        offset = sum(counts[:torch.distributed.get_rank(group)])
    if not first.shape[0] or not every.shape[0]:  # no pair here: 0, still through the gather (its backward is
        zero = (first.sum() + every.sum()) * 0.0  # collective too: every rank must run it)
        return zero, zero.detach()
    logits = first @ every.T / temperature  # (mine, all)
    target = torch.arange(first.shape[0], device=first.device) + offset
    return F.cross_entropy(logits, target, reduction="sum"), (logits.argmax(-1) == target).sum().float().detach()


def contrastive_view(batch, rows: np.ndarray, eod: int):
    """The batch with each row in `rows` (bool (b,)) prepared for the contrastive objective: its longest
    document (tokens between <eod>s, or its longest segment) split into two halves, first half segment
    0, second half 1, everything else 2 (attention stays inside each); positions restart in each half;
    no language-model targets; Batch.spans 1 / 2 on the halves. Other rows keep their attention (one
    segment, or their own segments) and everything else. A document of one token is both halves."""
    tokens = batch.tokens.numpy()
    b, s = tokens.shape
    has = batch.segments is not None
    seg = batch.segments.numpy().copy() if has else np.zeros((b, s), dtype=np.int32)
    pos, loss = batch.position_ids.numpy().copy(), batch.loss_mask.numpy().copy()
    spans = np.zeros((b, s), dtype=np.int8)
    for r in np.flatnonzero(rows):
        doc = seg[r] if has else np.concatenate([[0], np.cumsum(tokens[r, :-1] == eod)])
        real = tokens[r] != eod
        ids, counts = np.unique(doc[real], return_counts=True)
        at = np.flatnonzero(real & (doc == ids[np.argmax(counts)])) if len(ids) else np.array([0])
        half = max(1, len(at) // 2)
        first, second = (at[:half], at[half:]) if len(at) > 1 else (at, at)
        seg[r], spans[r, first], spans[r, second] = 2, 1, 2
        seg[r, first], seg[r, second] = 0, 1 if len(at) > 1 else 0
        pos[r, first], pos[r, second] = np.arange(len(first)), np.arange(len(second))
        loss[r] = 0.0
    batch.segments, batch.position_ids = torch.from_numpy(seg), torch.from_numpy(pos)
    batch.loss_mask, batch.spans = torch.from_numpy(loss), torch.from_numpy(spans)
    batch.doc_lengths = None  # the halves' segment ids are out of order: not plain documents
    return batch


def evaluation_sums(model, data, n_samples: int, objectives: Objectives) -> tuple[list[str], torch.Tensor]:
    """Every objective on the same validation samples: (keys, (len(keys), 3) float64 [summed loss, correct,
    units]) of this process's share. clm (key "clm": the language-model loss) and classify score the
    samples as they are; each transforming objective (denoise, permute, contrastive) its own view of them
    (data.val_batches(n, view=k)). The caller sums over data-parallel ranks and calls evaluation_values."""
    from gorilla_dist.config import ObjectiveConfig

    group, configs = objectives.dp_group, objectives.configs
    plain = Objectives([ObjectiveConfig(name="clm")] + [c for c in configs if c.name == "classify"], group)
    parts = [(plain, data.val_batches(n_samples))]
    parts += [(Objectives([c], group), data.val_batches(n_samples, k)) for k, c in enumerate(configs)
              if c.name in ("contrastive", "denoise", "permute")]
    keys = [key for part, _ in parts for key in part.keys]
    sums = [torch.stack([torch.cat([part.sums(model, b), part.units(b)[:, None]], 1) for b in batches]).sum(0)
            for part, batches in parts]
    return keys, torch.cat(sums).double()


def evaluation_values(keys: list[str], values: list[list[float]]) -> dict[str, float]:
    """{val_loss (the language-model loss), val_<key>_loss, val_<key>_accuracy (classify, contrastive)} from
    evaluation_sums' rows summed over ranks."""
    out = {"val_loss": values[0][0] / max(values[0][2], 1.0)}
    for key, (loss_sum, right, units) in zip(keys[1:], values[1:]):
        out[f"val_{key}_loss"] = loss_sum / max(units, 1.0)
        if key in ("classify", "contrastive"):
            out[f"val_{key}_accuracy"] = right / max(units, 1.0)
    return out


def build_objectives(configs, dp_group=None) -> Objectives:
    return Objectives(configs, dp_group)


def head_sizes(configs, n_sources: int) -> dict[str, int]:
    """The auxiliary heads the objectives need ({name: classes or width}) for a run with n_sources sources."""
    out = {}
    for c in configs:
        if c.name == "classify":
            out["classify"] = len(c.labels) if c.target == "label" else n_sources
        elif c.name == "contrastive":
            out["contrastive"] = c.projection
    return out


__all__ = ["HEADS", "Objective", "Objectives", "build_objectives", "classify_scores", "contrastive_view",
           "evaluation_sums", "evaluation_values", "head_sizes", "labelled", "resolve_labels"]
