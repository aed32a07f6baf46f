"""Using a trained model: sampling (with a KV cache), and a checkpoint's model loaded into this one process.

`sample` runs after training on all ranks at once (tensor-parallel logits are gathered, and every rank
draws from an identically seeded generator, so all ranks agree on every token), and in the generate
tool on one process. `checkpoint_model` / `inference_model` load a checkpoint written by any layout
into a single-process (TP=1) model, for generate, evaluate and the tests.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch


class Decoder:
    """Next-token logits of a growing sequence. With `cache`, keys and values of the tokens already seen
    are kept (megatron-core's static inference context, one per sequence) and each step runs the new
    tokens only; once the sequence is longer than seq_length the context window slides, which a cache
    cannot follow, and the last seq_length tokens are re-run each step (as without a cache). Either way
    the logits are those of the uncached model on the last seq_length tokens."""

    def __init__(self, model, seq_length: int, *, cache: bool = True):
        self.model, self.seq, self.cache = model, seq_length, cache
        self.context = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (1, t), the whole sequence so far (each call extends the previous one) -> (1, padded vocab),
        gathered over tensor-parallel ranks."""
        from megatron.core import parallel_state as ps

        from gorilla_dist.parallel import tp_all_gather

        t, device = ids.shape[1], ids.device
        virtual = getattr(self.model, "virtual_tokens", 0)  # prompt tuning: the cache holds them too
        if self.cache and t <= self.seq:
            from megatron.core.inference.contexts import StaticInferenceContext

            if self.context is None:
                self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=self.seq + virtual)
            start = max(self.context.sequence_len_offset - virtual, 0)
            pos = torch.arange(start, t, device=device).unsqueeze(0)
            out = self.model(ids[:, start:], pos, None, inference_context=self.context,
                             runtime_gather_output=True)[:, -1, :]  # (megatron gathers the vocabulary)
            self.context.sequence_len_offset = t + virtual
            return out
        window = ids[:, -self.seq:]
        n, tp = window.shape[1], ps.get_tensor_model_parallel_world_size()
        if getattr(getattr(self.model, "config", None), "sequence_parallel", False) and n % tp:
            # sequence parallelism splits the sequence over the TP ranks: pad the end to a multiple of tp.
            # Attention is causal, so the real positions' logits are unchanged (a learned sparse layout's last
            # query block does see the padding when it picks its key blocks).
            window = torch.nn.functional.pad(window, (0, -n % tp))
        pos = torch.arange(window.shape[1], device=device).unsqueeze(0)
        out = self.model(window, pos, None)[:, n - 1, :]  # (1, vocab / tp): the last real position
        if tp > 1:  # vocab-parallel logits -> full vocabulary
            out = torch.cat(tp_all_gather(out), dim=-1)
        return out


@torch.no_grad()
def sample_ids(model, ids: torch.Tensor, *, vocab_size: int, max_new_tokens: int, seq_length: int,
               temperature: float = 0.8, top_k: int | None = 200, seed: int = 0, cache: bool = True,
               stop: int | None = None) -> torch.Tensor:
    """ids (1, t) followed by up to max_new_tokens sampled ids (greedy when temperature <= 0), ending early
    after `stop` (e.g. <eod>). `cache`: keep keys and values (Decoder); the ids are the same without."""
    device = ids.device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    decoder = Decoder(model, seq_length, cache=cache)
    for _ in range(max_new_tokens):
        logits = decoder.logits(ids)[:, :vocab_size].float()  # drop the padding rows of the vocabulary
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
        if stop is not None and int(nxt) == stop:
            break
    model.train(was_training)
    return ids


def sample(model, tokenizer, prompt: str, *, max_new_tokens: int, seq_length: int, temperature: float = 0.8,
           top_k: int | None = 200, seed: int = 0, cache: bool = True) -> str:
    """The prompt and its sampled continuation, as text (see sample_ids)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long, device=device)[None]  # (1, t)
    out = sample_ids(model, ids, vocab_size=tokenizer.vocab_size, max_new_tokens=max_new_tokens,
                     seq_length=seq_length, temperature=temperature, top_k=top_k, seed=seed, cache=cache)
    return tokenizer.decode(out[0].tolist())


def caches(m) -> bool:
    """Whether model config `m` samples with a KV cache: its attention kernel declares kv_cache (dense and
    the static block-sparse layouts do; a learned layout chooses a block's keys from all of its queries, which
    a cache cannot reproduce). Without, the context is re-run each step."""
    from gorilla_dist.kernels.registry import attention_kernel

    return attention_kernel(m.attention).supports.kv_cache


def checkpoint_model(run_dir: str | os.PathLike, which: str, device):
    """(config, checkpoint directory, fp32 TP=1 model in eval mode with the checkpoint's weights,
    tokenizer). Needs torch.distributed and megatron's parallel state set up with TP=1."""
    from gorilla_dist.checkpoint import checkpoint_weights, load_consolidated, resolve_checkpoint
    from gorilla_dist.config import load_run_config
    from gorilla_dist.data.tokenizer import load_tokenizer
    from gorilla_dist.finetune import apply_finetune
    from gorilla_dist.model import build_model

    ckpt = resolve_checkpoint(run_dir, which)
    cfg = load_run_config(ckpt)
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    from gorilla_dist.objectives.mixture import head_sizes

    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size, dtype="fp32", device=device, seed=cfg.run.seed,
                        finetune=cfg.finetune, heads=head_sizes(cfg.train.objectives, len(cfg.data.sources)))
    apply_finetune(model, cfg.finetune)  # the run's adapters, if any
    load_consolidated(model, checkpoint_weights(ckpt), str(ckpt))
    return cfg, ckpt, model.eval(), tokenizer


@contextmanager
def inference_model(run_dir: str | os.PathLike, which: str = "latest"):
    """checkpoint_model in this one process (TP=1), whatever layout trained it; torch.distributed is
    set up for it and torn down on exit."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import ParallelConfig
    from gorilla_dist.engine.startup import import_megatron

    import_megatron(wandb=False)  # before anything else imports it: the tools (generate, evaluate) log nothing to W&B
    from gorilla_dist.parallel import init_distributed, teardown
    from gorilla_dist.runtime import single_process_env

    with mock.patch.dict(os.environ, single_process_env()):
        layout = init_distributed(OmegaConf.structured(ParallelConfig), deepspeed=False)  # trains nothing
        try:
            yield checkpoint_model(run_dir, which, layout.device)
        finally:
            teardown()
