"""nanoGPT's model and training loop in plain PyTorch: the baseline our full stack is measured against.

This follows karpathy/nanoGPT `model.py` + `train.py` (MIT) for the shakespeare_char CPU configuration:
learned absolute positions, pre-LayerNorm blocks without biases, GELU MLP, tied embeddings, AdamW with
weight decay on 2-D parameters, linear warmup + cosine LR, gradient clipping, `loss.item()` every
iteration (its CPU config logs every iteration), dropout where nanoGPT has it (embeddings, attention,
residuals), and bf16 through `torch.autocast` as its `dtype` setting does.

As a program (the whole process timed from outside, start-up included, as `python train.py` would be):
    python benchmarks/nanogpt_baseline.py train.bin val.bin --vocab 65 --iters 2000 [--dtype bf16] ...
reads nanoGPT's prepared uint16 token files and prints the result as one JSON line.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        x = x + F.dropout(self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C)), p, self.training)
        return x + F.dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))), p, self.training)


class NanoGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = F.dropout(self.wte(idx) + self.wpe(pos), self.dropout, self.training)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def train_nanogpt(train: np.ndarray, val: np.ndarray, vocab_size: int, *, iters: int, block: int = 64,
                  batch: int = 12, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, lr: float = 1e-3,
                  min_lr: float = 1e-4, warmup: int = 100, eval_interval: int = 250, eval_iters: int = 20,
                  seed: int = 1337, dropout: float = 0.0, dtype: str = "fp32") -> dict:
    torch.manual_seed(seed)
    model = NanoGPT(vocab_size, block, n_layer, n_head, n_embd, dropout)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")  # noqa: E731
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))

    def get_batch(data):
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate_val():
        model.eval()
        with autocast():
            out = torch.stack([model(*get_batch(val)).float() for _ in range(eval_iters)]).mean().item()
        model.train()
        return out

    step_times, val_losses = [], []
    start = time.perf_counter()
    for it in range(iters + 1):
        if it % eval_interval == 0 or it == iters:
            val_losses.append((it, estimate_val()))
        if it == iters:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        with autocast():
            loss = model(*get_batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        step_times.append(time.perf_counter() - t0)
    return {"wall_s": time.perf_counter() - start, "step_times": step_times, "val_losses": val_losses,
            "params": sum(p.numel() for p in model.parameters())}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_bin")
    ap.add_argument("val_bin")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--iters", type=int, default=2000)
    for name, default in (("block", 64), ("batch", 12), ("n_layer", 4), ("n_head", 4), ("n_embd", 128),
                          ("eval_interval", 250), ("eval_iters", 20), ("warmup", 100)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args()
    result = train_nanogpt(np.memmap(a.train_bin, dtype=np.uint16, mode="r"),
                           np.memmap(a.val_bin, dtype=np.uint16, mode="r"), a.vocab, iters=a.iters, block=a.block,
                           batch=a.batch, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                           eval_interval=a.eval_interval, eval_iters=a.eval_iters, warmup=a.warmup,
                           dropout=a.dropout, dtype=a.dtype)
    print(json.dumps(result))
