"""A training process: `python -m gorilla_dist.worker <run.dir>` (started by the launcher).

Reads only `run.dir/config.yaml`; rank and world come from the environment the launch backend set.
Exit status: 0 done, 75 stopped on a signal after saving a checkpoint (resume by starting again),
69 a collective failed (a peer rank died, hung or became unreachable), 2 config error, 1 any other error (a one-line message for user errors, a traceback for bugs).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gorilla_dist.worker <run.dir>", file=sys.stderr)
        return 2
    from gorilla_dist.runtime import quiet_libraries

    quiet_libraries()
    from gorilla_dist.config import check_inputs, load_run_config
    from gorilla_dist.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, UserError

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    cfg, hosts = None, ()
    try:
        cfg = load_run_config(argv[0])
        import torch

        from gorilla_dist.parallel import device_type

        kind = device_type(cfg.parallel.device)
        os.environ["DS_ACCELERATOR"] = kind  # DeepSpeed's accelerator follows the device
        check_inputs(cfg)
        from gorilla_dist.engine.startup import import_megatron

        import_megatron(wandb=cfg.logging.wandb.mode != "disabled")  # before anything else imports it
        from gorilla_dist.dtypes import device_settings
        from gorilla_dist.parallel import init_distributed, teardown
        from gorilla_dist.train import train

        device_settings(cfg.precision, cfg.parallel, torch.device(kind))
        layout = init_distributed(cfg.parallel)
        hosts = layout.hosts
        try:
            finished = train(cfg, layout)
        finally:
            teardown()
    except UserError as err:
        if not getattr(err, "printed_elsewhere", False):
            print(f"[rank {rank}] error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except RuntimeError as err:
        from gorilla_dist.parallel import describe_comm_failure

        message = (describe_comm_failure(err, int(rank), cfg.parallel.timeout_s, hosts,
                                         grace_s=cfg.parallel.census_grace_s) if cfg is not None else None)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    return 0 if finished else EXIT_PREEMPTED


if __name__ == "__main__":
    from gorilla_dist.engine.startup import exit_now

    exit_now(main(sys.argv[1:]))  # skips the interpreter's slow finalization (engine/startup.exit_now)
