"""A process's fixed costs: importing megatron-core without paying for what a run does not use, and
exiting without the interpreter's finalization (exit_now).

Importing megatron-core without paying for what a run does not use (start-up time; megatron-core
0.16.1, see versions.py). `import_megatron` runs in the worker, and in the tools that build a model (inference_model), before
anything else imports it.

Measured on a 2-core CPU box: `import megatron.core` took ~2.7 s of the worker's ~4.6 s start-up, and
two pieces of it are work nobody asked for:
1. megatron decorates a dozen small helpers (activations, gelu, norms, MoE routing) with
   `jit_fuser = torch.compile` at import time (megatron/core/jit.py), and `torch.compile(fn)` imports
   TorchDynamo and Inductor (~1.3 s) even though nothing is compiled until the function is first
   called. During the import `torch.compile` is a stand-in that calls the real one at that first call,
   so a helper that is used compiles exactly as before, and the import costs nothing.
2. megatron's inference context imports `wandb` when it is installed (~0.5 s), only to log dynamic
   batching. With W&B disabled (logging.wandb.mode=disabled) it is hidden during the import, which
   megatron treats as "not installed" (try/except ImportError); afterwards it is importable again.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys


def import_megatron(*, wandb: bool) -> None:
    """Import megatron.core (and its GPT model and transformer modules) now; see the module docstring."""
    if "megatron.core" in sys.modules:
        return
    import torch

    real_compile = torch.compile

    def deferred_compile(model=None, **kwargs):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred_compile(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)

        return call

    hidden = not wandb and "wandb" not in sys.modules
    torch.compile = deferred_compile
    if hidden:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError
    try:
        import megatron.core.models.gpt  # noqa: F401
        import megatron.core.transformer  # noqa: F401
    finally:
        torch.compile = real_compile
        if hidden:
            del sys.modules["wandb"]


def exit_now(code: int | None) -> None:
    """End this process with `code` after a clean return from its main function, without the interpreter's
    finalization. With torch, DeepSpeed and megatron-core loaded, finalization (tearing down thousands of
    modules and the C++ objects behind them) took 1.5-2.5 s per process on a 2-core machine (measured after
    a 1-step run; the atexit handlers themselves take ~20 ms), paid by every worker and tool a user or the
    test suite starts. The atexit handlers still run (logging, multiprocessing, weakref finalizers); our
    files are closed by then (metrics, checkpoints, W&B's finish). An exception takes the normal way out,
    with its traceback."""
    atexit._run_exitfuncs()  # CPython's own: what a normal exit runs before finalization
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
