"""Process helpers shared by the launcher, the workers and the tools. Imports nothing heavy at module
level: the launcher uses it without importing torch."""

from __future__ import annotations

import atexit
import os
import socket
import sys
import warnings


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_now(code: int | None) -> None:
    """End this process with `code` after a clean return from its main function, without the interpreter's
    finalization. With torch, DeepSpeed and megatron-core loaded, finalization (tearing down thousands of
    modules and the C++ objects behind them) took 1.5-2.5 s per process on a 2-core machine (measured after
    a 1-step run; the atexit handlers themselves take ~20 ms), paid by every worker and tool a user or the
    test suite starts. The atexit handlers still run (logging, multiprocessing, weakref finalizers); our
    files are closed by then (metrics, checkpoints, W&B's finish). An exception takes the normal way out,
    with its traceback."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def single_process_env() -> dict[str, str]:
    """The torch.distributed environment of a world of one on this machine (tools, in-process tests)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def quiet_libraries() -> None:
    """Silence the import-time notices megatron-core and DeepSpeed print about optional packages we
    deliberately run without (Transformer Engine, Apex) and DeepSpeed's INFO logging; name DeepSpeed's
    accelerator (cuda or cpu) instead of letting it guess and warn (the user's DS_ACCELERATOR wins)."""
    import logging

    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|transformer_engine|TE).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
