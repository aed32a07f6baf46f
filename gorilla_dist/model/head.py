"""A classification head (finetune.head=classification): a linear map of the final-normed hidden state
to `num_labels` class scores, in place of the language-model output — as transformers'
*ForSequenceClassification models do (their `score`, a bias-free linear), so export writes one.

Every head here is one kind of thing: a bias-free linear (`_linear`) on the final-normed hidden states, at
the model's output step (engine/output.py: where megatron turns them into logits, on the stage that has the
output), replicated on every tensor-parallel rank; under sequence parallelism the hidden states are gathered
first, with a backward that keeps each rank's own slice of the gradient, so nothing is counted twice.
Computing them inside the model's forward keeps ZeRO-3's parameter gathering as usual.

- The classifier, `classifier` (weight (num_labels, hidden)): its (b, s, num_labels) scores are the model's
  output instead of the language-model logits (which are then never computed). The loss (loss.py) reads
  them at each labelled example's last prompt token (data.loader.Batch.classes). The output layer is not
  used: its weight (when not tied to the embedding) stays frozen, as the base left it.
- Auxiliary heads of pretraining objectives (gorilla_dist/objectives: `objective_heads.<name>`), beside the
  language-model output: their per-position scores are kept (`objective_scores`, (b, s, classes) each); a
  sample's prediction is the mean of its positions' scores, which for a bias-free linear head equals the
  head on the mean-pooled hidden state.
"""

from __future__ import annotations

import torch

from gorilla_dist.engine.output import add_output_heads

HEAD = "classifier"
"""The head's module name; its parameter is `classifier.weight`, (num_labels, hidden)."""


HEADS = "objective_heads"
"""The pretraining objectives' heads (a ModuleDict): `objective_heads.<objective>.weight`."""


def _whole_sequence(model, hidden: torch.Tensor) -> torch.Tensor:
    """(s, b, h) final hidden states, gathered over the sequence-parallel ranks (the backward keeps each
    rank's own slice of the gradient: every rank computes the same head loss)."""
    if model.config.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden


def _linear(model: torch.nn.Module, classes: int, seed: int) -> torch.nn.Linear:
    """A bias-free (hidden -> classes) linear, normal init with the model's init std, seeded: the same on
    every rank and layout (a pipeline's last stage, which has no embeddings, included)."""
    w = next(model.parameters())
    head = torch.nn.Linear(model.config.hidden_size, classes, bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        init = torch.empty(head.weight.shape, dtype=torch.float32)
        init.normal_(0.0, model.config.init_method_std, generator=torch.Generator().manual_seed(seed))
        head.weight.copy_(init)
    return head


def attach_classifier(model: torch.nn.Module, num_labels: int, *, seed: int) -> None:
    """Add the head and make the model's forward return class scores. Attach it before the prompt-tuning
    hooks, which then drop the virtual tokens' scores like any other output. A pipeline stage without the
    output holds no head, but knows it belongs to a classifier (is_classifier: every stage takes the same
    branches of training and evaluation)."""
    model.num_labels = num_labels
    if not model.post_process:
        return
    model.add_module(HEAD, _linear(model, num_labels, seed + 7919))

    def scores(hidden):  # (s, b, h) -> (b, s, num_labels), the model's output
        return model.classifier(_whole_sequence(model, hidden)).transpose(0, 1)

    add_output_heads(model, scores, replace=True)


def is_classifier(model: torch.nn.Module) -> bool:
    return getattr(model, "num_labels", None) is not None


def attach_objective_heads(model: torch.nn.Module, classes: dict[str, int], *, seed: int) -> None:
    """Add a head per objective ({name: classes}) and the decoder hook that keeps their scores (on the stage
    with the output: the objectives' losses are computed there)."""
    if not model.post_process:
        return
    model.add_module(HEADS, torch.nn.ModuleDict({name: _linear(model, n, seed + 104_729 + i)
                                                 for i, (name, n) in enumerate(sorted(classes.items()))}))
    model.objective_scores = {}

    def keep(hidden):  # beside the language-model output
        hidden = _whole_sequence(model, hidden)
        model.objective_scores = {name: head(hidden).transpose(0, 1) for name, head in model.objective_heads.items()}

    add_output_heads(model, keep, replace=False)


def pooled_scores(model: torch.nn.Module, name: str, weights: torch.Tensor) -> torch.Tensor:
    """(b, classes): head `name`'s scores averaged over each sample's positions with `weights` (b, s)
    (e.g. its loss mask), i.e. the head on the mean-pooled hidden state. After a forward."""
    scores = model.objective_scores[name].float()  # (b, s', classes); s' > s with prompt tuning's tokens
    scores = scores[:, scores.shape[1] - weights.shape[1]:]
    return (scores * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)
