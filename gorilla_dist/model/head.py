"""A classification head (finetune.head=classification): a linear map of the final-normed hidden state
to `num_labels` class scores, in place of the language-model output — as transformers'
*ForSequenceClassification models do (their `score`, a bias-free linear), so export writes one.

The head is a module of megatron's GPTModel, `classifier` (weight (num_labels, hidden), replicated on
every tensor-parallel rank). GPTModel.post_process=False (megatron's switch for a pipeline stage without
the output layer) makes its forward return the hidden states; a forward hook turns them into
(b, s, num_labels) scores at every position (the tensor-parallel ranks then hold the same scores; under
sequence parallelism the hidden states are gathered first, with a backward that keeps each rank's own
slice of the gradient, so nothing is counted twice). The loss (loss.py) reads the scores at each
labelled example's last prompt token (data.loader.Batch.classes). The output layer is not used: its
weight (when not tied to the embedding) stays frozen, as the base left it.
"""

from __future__ import annotations

import torch

HEAD = "classifier"
"""The head's module name; its parameter is `classifier.weight`, (num_labels, hidden)."""


def _scores(model, _args, hidden):
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return model.classifier(hidden).transpose(0, 1)  # (s, b, h) -> (b, s, num_labels)


def attach_classifier(model: torch.nn.Module, num_labels: int, *, seed: int) -> None:
    """Add the head (normal init with the model's init std, seeded: the same on every rank) and make the
    model's forward return class scores. Attach it before the prompt-tuning hooks, which then drop the
    virtual tokens' scores like any other output."""
    w = model.embedding.word_embeddings.weight
    head = torch.nn.Linear(w.shape[1], num_labels, bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        init = torch.empty(head.weight.shape, dtype=torch.float32)
        init.normal_(0.0, model.config.init_method_std, generator=torch.Generator().manual_seed(seed + 7919))
        head.weight.copy_(init)
    model.add_module(HEAD, head)
    model.num_labels = num_labels
    model.post_process = False
    model.register_forward_hook(_scores)


def is_classifier(model: torch.nn.Module) -> bool:
    return hasattr(model, HEAD)
