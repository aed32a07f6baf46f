"""`python -m launcher`: compose the Hydra config, validate it, write it into run.dir, start workers.

The launcher never imports model code (no torch): the resolved `run.dir/config.yaml` is the only
thing passed to workers, so a resumed or requeued job rebuilds exactly the same run.
"""
