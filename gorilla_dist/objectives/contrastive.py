"""contrastive: the loader splits the longest document of the sample into two halves (`contrastive_view`:
segment ids keep each half attending to itself only; Batch.spans marks them); each half's mean hidden state
goes through a linear projection (`objective_heads.contrastive`) and is normalised; InfoNCE with temperature
tau matches every first half with its own second half among the second halves of all contrastive samples of
the micro-batch on every data-parallel rank (gathered with their gradients, so 2 ranks compute what 1
process does; the micro-batches are cut so that they are the same samples for every layout)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gorilla_dist.config.checks import positive
from gorilla_dist.objectives.base import Objective, ObjectiveOptions, positive_number
from gorilla_dist.objectives.classify import module_of


@dataclass
class ContrastiveOptions(ObjectiveOptions):
    temperature: float = 0.1
    """The InfoNCE temperature."""
    projection: int = 64
    """Width of the linear projection the pooled halves go through before normalising."""


class Contrastive(Objective):
    name = "contrastive"
    Options = ContrastiveOptions
    accuracy = True
    own_view = True
    pairs_across_ranks = True

    @classmethod
    def check(cls, o, where: str, data, finetune) -> None:
        positive_number(o.temperature, f"{where}.temperature")
        positive(o.projection, f"{where}.projection")

    def head_size(self, n_sources: int) -> int | None:
        return self.options.projection

    def view(self, batch, rows, eod: int):
        return contrastive_view(batch, rows, eod) if rows.any() else batch

    def sums(self, model, batch, rows, losses, group):
        return contrastive_sums(model, batch, rows, self.options.temperature, group)


def contrastive_sums(model, batch, rows, temperature: float, group):
    """(summed InfoNCE loss over this rank's contrastive samples `rows`, how many rank their own second
    half first), the negatives gathered over `group` with their gradients."""
    import torch
    import torch.nn.functional as F

    from gorilla_dist.model.head import pooled_scores

    module = module_of(model)
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
    import torch

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
