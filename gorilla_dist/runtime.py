"""Process helpers shared by the launcher, the workers and the tools. Imports nothing heavy at module
level: the launcher uses it without importing torch."""

from __future__ import annotations

import os
import socket
import warnings


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """The torch.distributed environment of a world of one on this machine (tools, in-process tests)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def quiet_libraries() -> None:
    """Silence the import-time notices megatron-core and DeepSpeed print about optional packages we
    deliberately run without (Transformer Engine, Apex) and DeepSpeed's INFO logging; name DeepSpeed's
    accelerator (cuda or cpu) instead of letting it guess and warn (the user's DS_ACCELERATOR wins here; a
    training worker sets it from parallel.device)."""
    import logging

    import torch

    warnings.filterwarnings("ignore", message=".*(Apex|apex|Transformer Engine|transformer_engine|TE).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def visible_gpus() -> int:
    """How many NVIDIA GPUs the processes started here would see, without importing torch (the launcher's
    checks): CUDA_VISIBLE_DEVICES when set, else the driver's device files /dev/nvidia0, /dev/nvidia1, ..."""
    import re
    from pathlib import Path

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [i.strip() for i in listed.split(",") if i.strip()]
        return 0 if not ids or ids[0].startswith("-") else len(ids)
    return sum(1 for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def has_package(name: str) -> bool:
    """Whether `import name` would find it (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(name) is not None
