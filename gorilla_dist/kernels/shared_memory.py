"""How much shared memory the block-sparse Triton kernels need per shape and GPU, and the launch plan that
keeps every launch inside it (no torch, no triton import: read by kernels/block_sparse.py at launch).

The numbers come from compiling the kernels for sm_80 and sm_90 ahead of time (kernels/triton_aot.py, which
writes `triton_shared_memory.json` beside this file). A launch that asks for more shared memory than the GPU
has fails ("out of resource: shared memory"); the tiles grow with block size x head dim and with the
software-pipelining depth (`num_stages`), so the large shapes kernels/limits.py allows do not fit every GPU.
`launch_plan` picks per kernel the deepest pipelining that fits, or says why none does; block_sparse then
runs the block-gather path (any shape, more memory traffic) and says so once. sm_86 / sm_89 (A10, L4,
RTX 30/40) read the sm_80 column and sm_100 the sm_90 one, each against its own device's limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("triton_shared_memory.json")
KERNELS = ("fwd", "bwd_dq", "bwd_dkv")
DTYPES = ("bf16", "fp16", "fp32", "fp32-tf32")
"""Element types as launched: fp32 with IEEE dots, or with TF32 dots (torch.backends.cuda.matmul.allow_tf32)."""
ARCHS = {80: "A100", 90: "H100"}
"""The compiled columns: compute capability -> the GPU it is named after."""
STAGES = (2, 1)
"""Pipelining depths tried, deepest first (2 is what the kernels were written for)."""
SHARED_MEMORY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
"""Opt-in shared memory per block in bytes by compute capability (CUDA C programming guide, technical
specifications); used where torch does not report it."""


def num_warps(head_dim: int) -> int:
    return 4 if head_dim <= 64 else 8


def table_arch(major: int, minor: int) -> int:
    """The compiled column a GPU of compute capability (major, minor) reads."""
    return 90 if major >= 9 else 80


def key(kernel: str, block: int, head_dim: int, dtype: str, arch: int, stages: int) -> str:
    return f"{kernel}/b{block}/d{head_dim}/{dtype}/sm{arch}/s{stages}"


def parse_key(k: str) -> tuple[str, int, int, str, int, int]:
    """key's inverse: (kernel, block, head dim, dtype, arch, num_stages)."""
    kernel, block, head_dim, dtype, arch, stages = k.split("/")
    return kernel, int(block[1:]), int(head_dim[1:]), dtype, int(arch[2:]), int(stages[1:])


def load_table() -> dict:
    return json.loads(TABLE.read_text())


@dataclass(frozen=True)
class LaunchPlan:
    options: dict | None
    """kernel -> {"num_warps", "num_stages"}; None: the Triton kernels do not fit (see reason)."""
    reason: str = ""


_TABLE: dict | None = None


def launch_plan(block: int, head_dim: int, dtype: str, arch: int, limit: int) -> LaunchPlan:
    """Per kernel the deepest pipelining whose shared memory fits `limit` bytes on the table column `arch`."""
    global _TABLE
    if _TABLE is None:
        _TABLE = load_table()["shared_bytes"]
    options = {}
    for kernel in KERNELS:
        # None: not compiled, a smaller shape already needed more than the column's GPU has (triton_aot._chain)
        needs = {s: _TABLE[key(kernel, block, head_dim, dtype, arch, s)] for s in STAGES}
        fits = [s for s in STAGES if needs[s] is not None and needs[s] <= limit]
        if not fits:
            least = needs[STAGES[-1]]
            need = f"{least:,} bytes" if least is not None else f"more than {SHARED_MEMORY[arch]:,} bytes"
            return LaunchPlan(None, f"the Triton block-sparse {kernel} kernel at block {block} x head dim {head_dim} "
                                    f"({dtype}) needs {need} of shared memory at num_stages={STAGES[-1]}; this GPU "
                                    f"allows {limit:,}")
        options[kernel] = {"num_warps": num_warps(head_dim), "num_stages": fits[0]}
    return LaunchPlan(options)
