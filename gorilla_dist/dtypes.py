"""Precision names (config.PRECISIONS) to torch dtypes: one table for the model, consolidate and export."""

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
