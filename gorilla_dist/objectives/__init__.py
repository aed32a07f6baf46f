"""Pretraining objectives mixed by ratio (train.objectives), each a plug-in.

Every training sample gets one objective: the loader assigns them per global batch with the data blend's
rule (data/order.py Blend: every window of samples follows the weights within one sample, independent of
the data-parallel size; its counters are part of the loader state, so a resumed run continues the same
sequence). Each objective sums its loss over its own samples and counts its units (target tokens,
samples); the step's loss is

    sum over objectives o of  weight_o * (sum_o / count_o)

with count_o the global batch's count (all micro-batches, all data-parallel ranks) — the same
normalisation the language-model loss has always had (train.train_step), so clm alone is exactly the
loss it was before objectives existed (mixture.py).

    clm.py          next-token cross entropy on the sample's targets
    classify.py     which data.sources entry the sample comes from, or each example's prepare-time label
    contrastive.py  InfoNCE between the two halves of a sample's longest document
    denoise.py      UL2's denoisers (input bidirectional, loss on the target)
    permute.py      BART's sentence permutation

Evaluation scores every objective on every validation sample: `val_loss` stays the language-model loss
(comparable with a clm-only run), and each other objective adds its own numbers.

**A new objective** is a subclass of `base.Objective` with its own options dataclass (base.py says what each
hook does), registered by name: `register_objective(MyObjective)` in the process that trains, or, for runs
started by the launcher, an entry point of an installed package in the group `gorilla_dist.objectives`
(`[project.entry-points."gorilla_dist.objectives"] mine = "mypackage.objectives:MyObjective"`): the
launcher and every worker find it by its name in train.objectives. No config value names code to run.
The loader, the loss, evaluation, metrics and the heads ask the objective (base.Objective's flags and
hooks) and never test its name.

This module imports no torch (the launcher checks the objectives' options with it); mixture.py does.
"""

from __future__ import annotations

import dataclasses

from gorilla_dist.errors import ConfigError
from gorilla_dist.kernels.registry import Registry
from gorilla_dist.objectives.base import Objective, ObjectiveOptions

ENTRY_POINTS = "gorilla_dist.objectives"
"""The entry point group installed packages register objectives in."""

OBJECTIVES = Registry(Objective, ENTRY_POINTS, {
    "clm": ("gorilla_dist.objectives.clm", "CLM"),
    "classify": ("gorilla_dist.objectives.classify", "Classify"),
    "contrastive": ("gorilla_dist.objectives.contrastive", "Contrastive"),
    "denoise": ("gorilla_dist.objectives.denoise", "Denoise"),
    "permute": ("gorilla_dist.objectives.permute", "Permute")},
    error=ConfigError)


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make `cls` available as train.objectives' `name: <cls.name>` in this process (usable as a decorator)."""
    return OBJECTIVES.register(cls)


def objective_names() -> list[str]:
    """Every objective this process can train: the built-in ones, then the registered and installed ones."""
    return OBJECTIVES.names()


def objective_class(name: str, where: str = "train.objectives[0]") -> type[Objective]:
    """The objective called `name`, or a ConfigError naming `where` and the valid names."""
    return OBJECTIVES.get(name, f"{where}.name")


def parse_objective(raw, where: str = "train.objectives[0]"):
    """One train.objectives entry (a dict, an OmegaConf node or an options object) as its objective's options
    dataclass, every field filled and typed; an unknown key or a wrong type is a ConfigError naming `where`."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if dataclasses.is_dataclass(raw) and not isinstance(raw, type):
        return raw
    data = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw or {})
    if not isinstance(data, dict) or data.get("name") is None:
        raise ConfigError(f"{where}: each objective needs a name, one of: {', '.join(objective_names())} (e.g. "
                          "'[{name: clm}]')")
    cls = objective_class(str(data["name"]), where)
    fields = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: {cls.name} has no option {unknown[0]!r}; its options: {', '.join(fields)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), data))
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None


def objective_options(name: str, **options):
    """The options of objective `name` (defaults for the rest): `objective_options("denoise", mode="X")`."""
    return parse_objective({"name": name, **options}, f"objective {name}")


def bind(configs) -> list[Objective]:
    """The run's objectives (train.objectives) as objective instances, in order, weights normalised."""
    parsed = [parse_objective(c, f"train.objectives[{i}]") for i, c in enumerate(configs)]
    total = sum(o.weight for o in parsed)
    return [objective_class(o.name)(o, i, o.weight / total) for i, o in enumerate(parsed)]


def check_objectives(objectives, data, finetune) -> list:
    """train.objectives: each entry parsed and checked by its objective; returns the parsed options."""
    import math

    if not objectives:
        raise ConfigError(f"train.objectives is empty; give at least one of {objective_names()}, e.g. "
                          "'[{name: clm}]'")
    parsed, labels = [], []
    for i, raw in enumerate(objectives):
        where = f"train.objectives[{i}]"
        o = parse_objective(raw, where)
        if not (o.weight > 0 and math.isfinite(o.weight)):
            raise ConfigError(f"{where}.weight={o.weight} ({o.name}) must be positive")
        cls = objective_class(o.name, where)
        cls.check(o, where, data, finetune)
        parsed.append(o)
        labels.append(cls.label(o))
    twice = sorted({n for n in labels if labels.count(n) > 1})
    if twice:
        raise ConfigError(f"train.objectives names {twice[0]} twice; give each objective once with its weight")
    if labels != ["clm"] and finetune.head != "none":
        raise ConfigError(f"train.objectives={labels} with finetune.head={finetune.head}: a classification run has its "
                          "own loss; use the default train.objectives")
    return parsed


def is_plain(configs) -> bool:
    """The language-model loss alone (train.objectives is clm alone): exactly the loss before objectives."""
    return len(configs) == 1 and parse_objective(configs[0]).name == "clm"


_RUNTIME = {"Objectives": "mixture", "build_objectives": "mixture", "evaluation_sums": "mixture",
            "evaluation_values": "mixture", "head_sizes": "mixture", "resolve_labels": "mixture",
            "contrastive_view": "contrastive", "labelled": "classify"}


def __getattr__(name: str):
    """The torch parts (mixture.py, the objectives' hooks), imported when first asked for."""
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(f"gorilla_dist.objectives.{_RUNTIME[name]}"), name)
    raise AttributeError(f"module 'gorilla_dist.objectives' has no attribute {name!r}")


__all__ = ["ENTRY_POINTS", "OBJECTIVES", "Objective", "ObjectiveOptions", "bind", "check_objectives", "is_plain",
           "objective_class", "objective_names", "objective_options", "parse_objective", "register_objective", *_RUNTIME]
