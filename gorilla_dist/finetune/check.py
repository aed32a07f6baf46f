"""`python -m gorilla_dist.finetune.check < <resolved config YAML>`: the launcher's check that
finetune.trainable / finetune.frozen select parameters of the run's model, before it writes anything into
run.dir. The model is built in this one process on the meta device (names and shapes, no memory: ~0.5 s
for model=1b after the imports), and finetune.apply_finetune runs its own checks on it, so the launcher and
the workers apply the same rule. Exit 2 with the error on stderr; 0 when the selection is fine."""

from __future__ import annotations

import sys


def check(text: str) -> None:
    from gorilla_dist.config import parse_run_config
    from gorilla_dist.engine.startup import import_megatron

    cfg = parse_run_config(text, "the launcher's config")
    import_megatron(wandb=False)
    import torch

    from gorilla_dist.finetune import apply_finetune
    from gorilla_dist.model import build_model
    from gorilla_dist.objectives import bind
    from gorilla_dist.objectives.mixture import head_sizes
    from gorilla_dist.parallel import init_single_process, teardown

    # classes come from the data when the run starts; their number changes no parameter's name
    if cfg.finetune.head != "none" and not cfg.finetune.num_labels:
        cfg.finetune.num_labels = 2
    bound = bind(cfg.train.objectives)
    for o in bound:
        o.sample_options()  # e.g. classes that come from the data: any number names the same parameters
    cfg.train.objectives = [o.options for o in bound]
    heads = head_sizes(cfg.train.objectives, max(1, len(cfg.data.sources)))
    init_single_process(device="cpu", deepspeed=False)  # (names only: no GPU, no DeepSpeed)
    try:
        with torch.device("meta"):  # (the vocabulary's size does not change any name)
            model = build_model(cfg.model, vocab_size=128, dtype="fp32", device=torch.device("meta"),
                                seed=cfg.run.seed, finetune=cfg.finetune, heads=heads)
        apply_finetune(model, cfg.finetune)
    finally:
        teardown()


def main() -> int:
    from gorilla_dist.cli import run_tool
    from gorilla_dist.runtime import quiet_libraries

    def body() -> int:
        quiet_libraries()
        check(sys.stdin.read())
        return 0

    return run_tool(body)


if __name__ == "__main__":
    status = main()
    from gorilla_dist.engine.startup import exit_now

    exit_now(status)
