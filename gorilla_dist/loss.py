"""The language-model loss, one definition for training, the loop's evaluation and `evaluate`.

The model's softmax covers the real vocabulary only (the padding rows of the output layer are masked
out: model/spec.py), so these are the numbers a transformers user gets from an exported model.
"""

from __future__ import annotations

import torch


def per_token_loss(model, batch) -> torch.Tensor:
    """(b, s) next-token cross entropy at every position (see data.loader.Batch)."""
    return model(batch.tokens, batch.position_ids, batch.segments, labels=batch.labels, **packed(batch))


def packed(batch) -> dict:
    """The model's keyword for packed plain documents on a GPU with flash-attn (kernels/dense.packed_documents)."""
    from gorilla_dist.kernels.dense import packed_documents

    return packed_documents(batch.tokens, getattr(batch, "doc_lengths", None))


def lm_loss(model, batch, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Training's loss: next-token cross entropy summed over the batch's unmasked targets (fp32), divided
    by `denominator`, by default their count (a mean over this batch)."""
    mask = batch.loss_mask
    if denominator is None:
        denominator = mask.sum().clamp(min=1.0)
    return (per_token_loss(model, batch).float() * mask).sum() / denominator


@torch.no_grad()
def lm_loss_sum(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss in nats, number of unmasked targets), both float64 0-d tensors on the batch's device.
    Held-out loss over many batches is sum(sums) / sum(counts): every target weighs the same, however
    the batches' masks differ (documents resetting attention, a padded last window)."""
    mask = batch.loss_mask.double()
    return (per_token_loss(model, batch).double() * mask).sum(), mask.sum()


def classified(batch) -> torch.Tensor:
    """(b, s) bool: the positions a classification head is scored at (data.loader.Batch.classes)."""
    if batch.classes is None:
        raise ValueError("a classification head needs labelled data (Batch.classes)")
    return batch.classes >= 0


def class_loss_sum(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A model with a classification head (model/head.py): (summed cross entropy over the batch's
    labelled examples (fp32, with gradient), their count, how many the argmax gets right)."""
    from gorilla_dist.objectives.classify import labelled_sums

    scores = model(batch.tokens, batch.position_ids, batch.segments, **packed(batch)).float()  # (b, s, labels)
    return labelled_sums(scores, batch.classes, classified(batch))
