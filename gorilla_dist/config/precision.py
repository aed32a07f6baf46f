"""precision: the training dtype and fp16 loss scaling."""

from __future__ import annotations

from dataclasses import dataclass

from gorilla_dist.config.checks import choice

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"
    """Training precision: fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)."""
    initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 only: steps without overflow before the loss scale is raised."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions use TF32 tensor cores (inputs rounded to 10 mantissa bits,
    fp32 accumulation), as Megatron and most trainers do; false: full fp32. Nothing changes on a CPU."""


def check_precision(pr) -> None:
    choice(pr.dtype, PRECISIONS, "precision.dtype")
