"""Checks every config section uses: a value from a list of choices, a positive number. Each raises
ConfigError naming the key, the value and what would be valid."""

from __future__ import annotations

from gorilla_dist.errors import ConfigError


def choice(value, valid, key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def positive(value, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")
