"""`python -m gorilla_dist.data.prepare input=... output=... [tokenizer=...] ...`: text files → a prepared
dataset directory (tokenized shards, document index, meta.json). The work is gorilla_dist.data.writer's
`prepare`, which the loader also calls to prepare data.path inside a run; this module is the command line
only, and nothing imports it."""

from __future__ import annotations

import sys

from gorilla_dist.data.writer import PrepareArgs, prepare


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import parse_key_values, run_tool

    def body() -> int:
        args = parse_key_values(argv, PrepareArgs, lists=("input",))
        prepare(PrepareArgs(**{k: getattr(args, k) for k in PrepareArgs.__dataclass_fields__}))
        return 0

    try:
        return run_tool(body)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
