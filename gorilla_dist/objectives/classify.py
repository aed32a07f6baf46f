"""classify: which data.sources entry a sample comes from (target=source: the mean of its final-normed hidden
states over its scored positions, through a bias-free linear head, `objective_heads.classify`, an auxiliary
parameter checkpointed like any other and left out by export), or (target=label) each example's
prepare-time `label`, from the head's score at its last prompt token (Batch.classes, the position
finetune.head=classification reads), per labelled example."""

from __future__ import annotations

from dataclasses import dataclass, field

from gorilla_dist.config.checks import choice
from gorilla_dist.errors import ConfigError
from gorilla_dist.objectives.base import Objective, ObjectiveOptions

CLASSIFY_TARGETS = ("source", "label")


@dataclass
class ClassifyOptions(ObjectiveOptions):
    target: str = "source"
    """What to predict: source (the sample's data.sources index, from its mean-pooled hidden states) | label
    (the `label` each example got at prepare time, from the hidden state of its last prompt token, as
    finetune.head=classification reads it; every example of a packed sample counts)."""
    labels: list[str] = field(default_factory=list)
    """target=label: the class names in id order; filled from the data by the run (checkpoints record them);
    given, they must be the data's."""


def resolve_classes(key: str, given, label_names: list[str] | None, *, needs: str, hint: str = "") -> list[str]:
    """The class names (in id order) a classifier of the data's labels scores, for both classifiers (this
    objective with target: label, and finetune.head=classification): the data's, which the config's `key`
    (e.g. finetune.labels), when given, must equal; data without labels is refused with `needs` (what the
    run needs, the refusal's first words; `hint` follows it)."""
    if label_names is None:
        raise ConfigError(f"{needs} needs labelled data: rows with a 'label' field, prepared with python -m "
                          f"gorilla_dist.data.prepare ... format=instruction{hint}")
    if given and list(given) != label_names:
        raise ConfigError(f"{key}={list(given)} but the data's classes are {label_names} (in id order)")
    return list(label_names)


def labelled(batch, rows):
    """(b, s) bool: the positions of `rows` where a labelled example's class is read (Batch.classes)."""
    import torch

    if batch.classes is None:
        return torch.zeros_like(batch.loss_mask, dtype=torch.bool)
    return (batch.classes >= 0) & rows[:, None]


def labelled_sums(scores, classes, at):
    """(summed cross entropy over the labelled positions `at` ((b, s) bool) of `scores` ((b, s, classes)), their
    count, how many the argmax gets right): the loss of both classifiers (finetune.head=classification and this
    objective with target: label). Every position is computed and the unlabelled ones ignored: selecting the
    labelled ones (scores[at]) would make the host wait for their number."""
    import torch
    import torch.nn.functional as F

    labels = torch.where(at, classes, -100)
    return (F.cross_entropy(scores.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100),
            at.sum().float(), ((scores.argmax(-1) == classes) & at).sum().float())


def module_of(model):
    """The model itself, under a TrainEngine or not."""
    return model.module if hasattr(model, "module") else model


class Classify(Objective):
    name = "classify"
    Options = ClassifyOptions
    accuracy = True

    @classmethod
    def check(cls, o, where: str, data, finetune) -> None:
        choice(o.target, CLASSIFY_TARGETS, f"{where}.target")
        if o.target == "source" and not data.sources:
            raise ConfigError("train.objectives: classify predicts which data.sources entry a sample comes from; give "
                              "two or more data.sources (or target: label, for data prepared with labels)")
        if o.target == "source" and len(data.sources) < 2:
            raise ConfigError(f"train.objectives: classify with {len(data.sources)} data.sources has nothing to tell "
                              "apart; give two or more sources")

    @property
    def by_label(self) -> bool:
        return self.options.target == "label"

    def head_size(self, n_sources: int) -> int | None:
        return len(self.options.labels) if self.by_label else n_sources

    def resolve(self, where: str, label_names: list[str] | None) -> None:
        """target=label: fill `labels` from the data's classes, or refuse data without labels, or with other
        classes than the config names."""
        if self.by_label:
            self.options.labels = resolve_classes(f"{where}.labels", self.options.labels, label_names,
                                                  needs=f"{where}: classify with target: label",
                                                  hint=" (train_on_inputs=true to keep the language-model loss on "
                                                       "the text)")

    def sample_options(self) -> None:
        if self.by_label and not self.options.labels:
            self.options.labels = ["a", "b"]

    def units(self, batch, rows):
        return labelled(batch, rows).sum().float() if self.by_label else rows.sum().float()

    def sums(self, model, batch, rows, losses, group):
        import torch.nn.functional as F

        from gorilla_dist.model.head import pooled_scores

        module = module_of(model)
        if self.by_label:  # each labelled example's class, at its last prompt token
            scores = module.objective_scores["classify"].float()
            scores = scores[:, scores.shape[1] - batch.loss_mask.shape[1]:]  # (b, s, classes)
            if batch.classes is None:  # no labelled example here: 0, through the head
                return scores.sum() * 0.0, scores.new_zeros(())
            ce, _, right = labelled_sums(scores, batch.classes, labelled(batch, rows))
            return ce, right.detach()
        scores = pooled_scores(module, "classify", batch.loss_mask)  # (b, sources): the sample's source
        ce = F.cross_entropy(scores, batch.source, reduction="none")
        right = (scores.argmax(-1) == batch.source).float()
        w = rows.float()
        return (ce * w).sum(), (right * w).sum().detach()
