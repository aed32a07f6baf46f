"""Precision names (config.PRECISIONS) to torch dtypes: one table for the model, consolidate and export."""

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_speed_ratio(dtype: str, device: torch.device, n: int = 256, reps: int = 3) -> float:
    """How many times faster a (n x n) matmul runs in `dtype` than in fp32 on `device` (a few ms; n is
    kept small because an emulated bf16 matmul runs ~100x slower than fp32)."""
    import time

    def seconds(torch_dtype) -> float:
        a = torch.randn(n, n, device=device).to(torch_dtype)
        a @ a  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            a @ a
        return time.perf_counter() - start

    return seconds(torch.float32) / seconds(TORCH_DTYPES[dtype])


def precision_notice(dtype: str, device: torch.device, ratio=matmul_speed_ratio) -> str | None:
    """One line for a user who asked for bf16/fp16 on a CPU that only emulates it (no avx512_bf16 or AMX:
    measured 0.8 GFLOP/s bf16 against 53 fp32 on one such machine), else None. GPUs run both natively."""
    if dtype == "fp32" or device.type != "cpu":
        return None
    speed = ratio(dtype, device)
    if speed >= 1.0:
        return None
    return (f"[precision] precision={dtype}: {dtype} matmuls run at {speed:.2f}x the speed of fp32 on this CPU "
            f"(it has no native {dtype} instructions, so they are emulated); precision=fp32 will train faster")


def device_settings(precision, parallel, device: torch.device) -> dict[str, str]:
    """Per-process settings for a CUDA device, applied before the first kernel: TF32 for fp32 matmuls
    (precision.tf32), and the environment megatron's tensor / sequence parallelism wants
    (CUDA_DEVICE_MAX_CONNECTIONS=1: one hardware queue, so a layer's communication is issued before the
    next layer's compute, which its overlap relies on). Returns the environment variables it set; on a CPU
    nothing happens."""
    import os

    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = bool(precision.tf32)
    torch.backends.cudnn.allow_tf32 = bool(precision.tf32)
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if parallel.tp > 1 else {}
    env = {k: v for k, v in env.items() if k not in os.environ}  # the user's own setting wins
    os.environ.update(env)
    return env
