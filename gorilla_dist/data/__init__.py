"""Training data: a text file → token files in run.dir/data → per-rank batches.

This is the minimal data path of the first slice (char/byte tokens, random fixed-length windows).
The interface the trainer uses — `build_data(cfg, layout)` returning an object with `vocab_size`,
`tokenizer`, `next_train_batches()`, `val_batches()`, `state_dict()` / `load_state_dict()` —
is what the full shard pipeline will implement too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gorilla_dist.data.text import load_tokenizer, prepare_text
from gorilla_dist.errors import DataError

__all__ = ["WindowData", "build_data", "load_tokenizer", "prepare_text"]


class WindowData:
    """Random fixed-length windows of a token array, as nanoGPT samples them, made reproducible
    and resumable: the windows of global batch k are a pure function of (seed, k), so the only
    state is k, and the global sample sequence is the same for every data-parallel size.

    Global batch k has `global_batch_size` windows; data-parallel rank r takes the r-th contiguous
    slice of them and cuts it into micro-batches of `micro_batch_size`.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, tokenizer, *, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp: int, dp_rank: int, seed: int, device: torch.device):
        self.train, self.val, self.tokenizer = train, val, tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seq, self.micro, self.global_batch = seq_length, micro_batch_size, global_batch_size
        self.dp, self.dp_rank, self.seed, self.device = dp, dp_rank, seed, device
        self.position = 0  # global batches consumed

    def _windows(self, data: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = offsets[:, None] + np.arange(self.seq + 1)[None, :]  # (b, seq+1)
        tokens = torch.from_numpy(data[idx].astype(np.int64))
        x, y = tokens[:, :-1], tokens[:, 1:]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _rank_batches(self, data: np.ndarray, rng_key: list[int], n_global: int):
        offsets = np.random.default_rng(rng_key).integers(0, len(data) - self.seq - 1, size=n_global)
        per_rank = n_global // self.dp
        mine = offsets[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [self._windows(data, mine[i:i + self.micro]) for i in range(0, per_rank, self.micro)]

    def next_train_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches (inputs, targets), each (micro_batch_size, seq_length)."""
        batches = self._rank_batches(self.train, [self.seed, self.position], self.global_batch)
        self.position += 1
        return batches

    def val_batches(self, n_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same validation windows at every evaluation; n_micro micro-batches per rank."""
        return self._rank_batches(self.val, [self.seed, 1 << 40], n_micro * self.micro * self.dp)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "global_batch_size": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("seed", self.seed), ("global_batch_size", self.global_batch)):
            if int(state[key]) != now:
                raise DataError(f"the checkpoint's data position was saved with {key}={state[key]}, this run has "
                                f"{now}: resuming would not continue the same sample sequence; keep {key} or "
                                "start a new run.dir")
        self.position = int(state["position"])


def build_data(cfg, layout) -> WindowData:
    """Tokenize cfg.data.path into run.dir/data once (rank 0; the others wait), then memory-map it."""
    from gorilla_dist.parallel import on_main

    out = Path(cfg.run.dir) / "data"
    on_main(lambda: prepare_text(cfg.data.path, cfg.data.tokenizer, out, val_fraction=cfg.data.val_fraction,
                                 min_tokens=cfg.model.seq_length + 2), layout)
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    return WindowData(train, val, load_tokenizer(out), seq_length=cfg.model.seq_length,
                      micro_batch_size=cfg.train.micro_batch_size, global_batch_size=cfg.train.global_batch_size,
                      dp=layout.dp, dp_rank=layout.dp_rank, seed=cfg.run.seed, device=layout.device)
