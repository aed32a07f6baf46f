"""The command line's overrides checked against the schema before Hydra composes anything, so a typo is
one line naming the closest valid key or option (Hydra's own errors are 5-7 lines and, for `+key`, suggest
adding the typo as a new key, which the worker then refuses after the run directory was written)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gorilla_dist.config import Config
from gorilla_dist.errors import ConfigError

# Hydra's options that take the next word as their value (the rest of argv is overrides and flags)
_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun"}
_LIST_KEYS = "`python -m launcher --cfg job` prints every key"


def override_words(argv: list[str]) -> list[str]:
    """The words of argv that are Hydra overrides (not flags such as -m, --cfg job)."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in _WITH_VALUE
        else:
            words.append(word)
    return words


def check_overrides(argv: list[str], conf_dir: str | Path) -> None:
    """Raise a one-line ConfigError for an override that cannot parse, names a key the schema lacks
    (`+key` included), picks an option a config group lacks, or gives a field a value of the wrong type."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    schema = OmegaConf.structured(Config)
    groups = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in Path(conf_dir).iterdir() if d.is_dir()}
    for word in override_words(argv):
        try:
            (override,) = parser.parse_overrides([word])
        except OverrideParseException as err:
            raise ConfigError(f"cannot read the override {word!r}: {str(err).splitlines()[0]} (a value with spaces, "
                              "brackets or braces goes in quotes, on one line: \"key=[{a: 1}, {b: 2}]\")") from None
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra":
            continue
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.value()])
        if key in groups and override.type == OverrideType.CHANGE:
            for value in values:
                if str(value) not in groups[key]:
                    raise ConfigError(f"{key}={value}: no such option in conf/{key}/; choose one of: "
                                      f"{', '.join(groups[key])}{_closest(str(value), groups[key], key + '=')}")
            continue
        known, hint = _lookup(key)
        if override.type == OverrideType.ADD and known:
            raise ConfigError(f"{word}: {key} is already in the config; set it without the '+' ({word[1:]})")
        if not known:
            raise ConfigError(f"{word}: the config has no key {key!r}{hint}; {_LIST_KEYS}"
                              + (" ('+' cannot add keys: the config has a fixed schema)"
                                 if override.type in (OverrideType.ADD, OverrideType.FORCE_ADD) else ""))
        if override.type == OverrideType.DEL:
            raise ConfigError(f"{word}: keys cannot be deleted (the config has a fixed schema); set {key} to a value")
        for value in values:
            try:
                OmegaConf.update(schema, key, value, merge=True)
            except (OmegaConfBaseException, ValueError) as err:
                shown = f"{key}={value}" if override.is_sweep_override() else word
                raise ConfigError(f"{shown}: {str(err).splitlines()[0]}") from None


def _lookup(key: str) -> tuple[bool, str]:
    """(whether the schema has the dotted key, and when not ' (did you mean model.num_layers?)' for the
    closest key at its first wrong part). Below a list or a dict (data.sources, train.objectives) the walk
    stops: OmegaConf checks those."""
    node, done = Config, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            break
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False, _closest(part, list(hints), "".join(f"{d}." for d in done))
        done.append(part)
        node = hints[part]
    return True, ""


def _closest(word: str, choices: list[str], prefix: str) -> str:
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{near[0]}?)" if near else ""
