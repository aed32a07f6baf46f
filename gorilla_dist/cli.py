"""key=value command lines for the small tools (generate, prepare), checked against a dataclass."""

from __future__ import annotations

import dataclasses
import sys

from gorilla_dist.errors import UserError


def run_tool(body) -> int:
    """A tool's `main`: run `body()` (which returns the exit status); a UserError prints `error: ...` on
    stderr, without a traceback, and its exit code is the status."""
    try:
        return body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


def parse_key_values(argv: list[str], schema, *, aliases: dict[str, str] | None = None, lists: tuple = ()):
    """Parse `key=value` items into an OmegaConf object typed by `schema` (a dataclass).

    Values stay strings until the schema converts them (a prompt like `ROMEO:` is text, not YAML);
    `none`/`null` set an optional field to None; keys in `lists` accumulate comma-separated values
    over repeated items; `aliases` maps command-line names (e.g. run.dir) to field names."""
    from omegaconf import OmegaConf

    args = OmegaConf.structured(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    optional = {f.name for f in dataclasses.fields(schema) if "None" in str(f.type)}
    shown = {v: k for k, v in (aliases or {}).items()}
    valid = " ".join(f"{shown.get(n, n)}=" for n in names)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"argument {item!r} is not key=value; valid: {valid}")
        key = (aliases or {}).get(key, key)
        try:
            if key in lists:
                getattr(args, key).extend([v for v in value.split(",") if v])
            elif key in optional and value.lower() in ("none", "null"):
                setattr(args, key, None)
            else:
                setattr(args, key, value)
        except Exception as err:  # noqa: BLE001 - omegaconf names the key and the expected type
            raise UserError(f"{item!r}: {(str(err) or type(err).__name__).splitlines()[0]}; valid: {valid}") from None
    return args
