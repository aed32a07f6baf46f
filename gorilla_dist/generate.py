"""`python -m gorilla_dist.generate run.dir=... prompt=... max_new_tokens=...`: text from a checkpoint.

Loads the weights of a checkpoint (any training layout) into a single-process model and samples from
it (gorilla_dist.inference). A run with a classification head (finetune.head=classification) prints
the prompt's most probable classes instead, one per line with its probability.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass
class GenerateArgs:
    run_dir: str | None = None
    """The training run's directory (run.dir=...)."""
    checkpoint: str = "latest"
    """latest (newest complete checkpoint of run.dir) or a checkpoint directory."""
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 0.8
    """0 means greedy."""
    top_k: int | None = 200
    seed: int = 1337
    cache: bool | None = None
    """Keep keys and values between steps. Unset: wherever the model's attention kernel decodes with a KV
    cache (dense and the static block-sparse layouts; learned re-runs the context); true: a cache, or a
    refusal naming what the kernel lacks; false: re-run the context each step (the slow reference). The
    tokens are the same either way."""


def parse_args(argv: list[str]):
    """The arguments, checked (values, the run directory and checkpoint exist) before torch is imported."""
    from gorilla_dist.cli import parse_key_values
    from gorilla_dist.config import check_checkpoint_source
    from gorilla_dist.errors import ConfigError

    args = parse_key_values(argv, GenerateArgs, aliases={"run.dir": "run_dir"})
    if args.temperature < 0:
        raise ConfigError(f"temperature={args.temperature} must be >= 0 (0: greedy)")
    if args.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={args.max_new_tokens} must be >= 0")
    if args.top_k is not None and args.top_k < 0:
        raise ConfigError(f"top_k={args.top_k} must be >= 0 (0 or none: no top-k filter)")
    if args.top_k == 0:
        args.top_k = None
    check_checkpoint_source(args.run_dir, args.checkpoint)
    return args


def main(argv: list[str]) -> int:
    from gorilla_dist.cli import run_tool
    from gorilla_dist.runtime import quiet_libraries

    def body() -> int:
        args = parse_args(argv)
        quiet_libraries()  # (imports torch)
        print(generate(args), flush=True)
        return 0

    return run_tool(body)


def generate(args) -> str:
    from gorilla_dist.errors import ConfigError
    from gorilla_dist.inference import caches, inference_model, sample
    from gorilla_dist.kernels.registry import attention_kernel, missing

    with inference_model(args.run_dir, args.checkpoint) as (cfg, _, model, tokenizer):
        if cfg.finetune.head != "none":
            return classify(model, tokenizer, args.prompt, cfg.finetune.labels)
        if args.cache and not caches(cfg.model):
            raise ConfigError(f"cache=true: {missing(attention_kernel(cfg.model.attention), 'kv_cache', cfg.model)}; "
                              "use cache=false, or leave cache unset (the context is then re-run each step)")
        return sample(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      seq_length=cfg.model.seq_length, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, cache=caches(cfg.model) if args.cache is None else args.cache)


def classify(model, tokenizer, prompt: str, labels: list[str], top: int = 5) -> str:
    """A classification run: the classes its head gives the prompt's last token, most probable first."""
    import torch

    from gorilla_dist.errors import UserError

    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long)[None]
    if not ids.shape[1]:
        raise UserError("prompt= is empty; a classifier scores the last token of a prompt")
    with torch.no_grad():
        probs = model(ids, torch.arange(ids.shape[1])[None], None)[0, -1].float().softmax(-1)
    best = probs.argsort(descending=True)[:top].tolist()
    return "\n".join(f"{labels[i]}\t{probs[i]:.4f}" for i in best)


if __name__ == "__main__":
    status = main(sys.argv[1:])
    if "torch" not in sys.modules:  # refused before loading anything
        sys.exit(status)
    from gorilla_dist.engine.startup import exit_now

    exit_now(status)  # skips the interpreter's slow finalization (engine/startup.exit_now)
