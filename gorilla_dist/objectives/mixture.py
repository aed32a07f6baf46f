"""The run's mixture of objectives at run time (torch): how a micro-batch's loss is made of them, and how
evaluation scores each (see the package docstring for the rule)."""

from __future__ import annotations

import torch

from gorilla_dist.loss import per_token_loss
from gorilla_dist.model.head import HEADS
from gorilla_dist.objectives import bind, is_plain, objective_options


class Objectives:
    """The run's objectives (from train.objectives) and how a micro-batch's loss is made of them."""

    def __init__(self, configs, dp_group=None):
        """dp_group: the data-parallel process group objectives that pair samples across ranks gather over
        (None: this process only)."""
        self.items = bind(configs)
        self.configs = [o.options for o in self.items]
        self.dp_group = dp_group
        self.keys = [o.key for o in self.items]
        self.plain = is_plain(self.configs)  # the language-model loss alone, exactly as before

    @property
    def accuracy_keys(self) -> set[str]:
        """The objectives that count correct predictions (their accuracy is logged)."""
        return {o.key for o in self.items if o.accuracy}

    def resolve(self, label_names: list[str] | None) -> None:
        """Options that come from the data (classify target=label: the classes), filled in place, or refused."""
        for o in self.items:
            o.resolve(f"train.objectives[{o.index}]", label_names)

    def rows(self, batch, o) -> torch.Tensor:
        """(b,) bool: the micro-batch's samples with objective o (validation: every scored sample)."""
        if batch.objective is None:
            if batch.scored is not None:
                return batch.scored
            return torch.ones(batch.tokens.shape[0], dtype=torch.bool, device=batch.tokens.device)
        return batch.objective == o.index

    def units(self, batch) -> torch.Tensor:
        """(objectives,) float: what each objective's loss averages over, in this micro-batch."""
        return torch.stack([o.units(batch, self.rows(batch, o)) for o in self.items])

    def sums(self, model, batch) -> torch.Tensor:
        """(objectives, 2) float32: each objective's summed loss (with gradient) and its correct predictions
        (0 for those that count none), over its samples in this micro-batch. One forward."""
        losses = per_token_loss(model, batch).float()  # (b, s)
        if self.plain:  # exactly the language-model loss as it always was
            return torch.stack([(losses * batch.loss_mask).sum(), losses.new_zeros(())])[None]
        return torch.stack([torch.stack(o.sums(model, batch, self.rows(batch, o), losses, self.dp_group))
                            for o in self.items])

    def loss(self, sums: torch.Tensor, per_micro: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the step loss: sum_o weight_o * sums_o / per_micro_o, where
        per_micro_o = global count_o / (dp * micro-batches) (DeepSpeed averages the gradients)."""
        if self.plain:
            return sums[0, 0] / per_micro[0]
        return sum(o.weight * sums[o.index, 0] / per_micro[o.index] for o in self.items)


def resolve_labels(configs, label_names: list[str] | None) -> None:
    """Options that come from the data (classify target=label: the classes), filled in place, or refused."""
    Objectives(configs).resolve(label_names)


def evaluation_sums(engine, data, n_samples: int, objectives: Objectives) -> tuple[list[str], torch.Tensor]:
    """Every objective on the same validation samples: (keys, (len(keys), 3) float64 [summed loss, correct,
    units]) of this process's share. The language-model loss (key "clm") and every objective without a view of
    its own score the samples as they are; each objective with its own view (denoise, permute, contrastive)
    its own view of them (data.val_batches(n, view=k)). `engine`: a TrainEngine (its evaluate_sums), or a
    module in one process (evaluate.py). The caller sums over data-parallel ranks and calls evaluation_values."""
    group, items = objectives.dp_group, objectives.items
    plain = Objectives([objective_options("clm")] + [o.options for o in items if not o.token_loss and not o.own_view],
                       group)
    parts = [(plain, data.val_batches(n_samples))]
    parts += [(Objectives([o.options], group), data.val_batches(n_samples, o.index)) for o in items if o.own_view]
    keys = [key for part, _ in parts for key in part.keys]
    sums = []
    for part, batches in parts:
        width = len(part.keys) * 3

        def scored(engine, b, part=part):
            return tuple(torch.cat([part.sums(engine, b), part.units(b)[:, None].to(torch.float32)], 1).flatten())

        # through the engine's forward-only pass (a pipeline's stages: computed on the last, on every stage)
        if hasattr(engine, "evaluate_sums"):
            summed = engine.evaluate_sums(batches, scored, width)
        else:  # a module in one process
            summed = torch.stack([torch.stack(scored(engine, b)) for b in batches]).sum(0)
        sums.append(summed.reshape(len(part.keys), 3))
    return keys, torch.cat(sums).double()


def evaluation_values(keys: list[str], values: list[list[float]], accuracy: set[str] = frozenset()) -> dict[str, float]:
    """{val_loss (the language-model loss), val_<key>_loss, val_<key>_accuracy (the keys in `accuracy`)} from
    evaluation_sums' rows summed over ranks."""
    out = {"val_loss": values[0][0] / max(values[0][2], 1.0)}
    for key, (loss_sum, right, units) in zip(keys[1:], values[1:]):
        out[f"val_{key}_loss"] = loss_sum / max(units, 1.0)
        if key in accuracy:
            out[f"val_{key}_accuracy"] = right / max(units, 1.0)
    return out


def build_objectives(configs, dp_group=None) -> Objectives:
    return Objectives(configs, dp_group)


def head_sizes(configs, n_sources: int) -> dict[str, int]:
    """The auxiliary heads the objectives need ({name: classes or width}) for a run with n_sources sources."""
    return {o.name: size for o in bind(configs) if (size := o.head_size(n_sources)) is not None}


__all__ = ["HEADS", "Objectives", "build_objectives", "evaluation_sums", "evaluation_values", "head_sizes",
           "resolve_labels"]
