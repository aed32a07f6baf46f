"""The gradients of one training step (4 micro-batches, the real engine and train_step, no clipping), written per
parameter under its single-process name: `python pipeline_grads.py OUT [key=value ...]` in one process, or under
torchrun with parallel.pp=2 (every stage writes its own; the tied embeddings' copy on the last stage is left out:
the first stage writes them). tests/distributed/test_pipeline.py compares the two."""

import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from gorilla_dist.config import OptimConfig, ParallelConfig, PrecisionConfig, TrainConfig
from gorilla_dist.config.model import ModelConfig
from gorilla_dist.data.loader import Batch
from gorilla_dist.engine import build_engine, state
from gorilla_dist.engine.state import is_stage_copy, single_process_name
from gorilla_dist.model import build_model
from gorilla_dist.parallel import init_distributed, teardown
from gorilla_dist.train import train_step

VOCAB, SEQ, MICRO, GLOBAL = 50, 16, 2, 8


def batches() -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=g)
    mask = torch.ones(GLOBAL, SEQ)
    mask[1, :5] = 0  # targets that do not count: the loss divides by the global count
    segments = torch.zeros(GLOBAL, SEQ, dtype=torch.int32)
    segments[:, SEQ // 2:] = 1  # two documents per sample: attention stays inside each, on every stage
    pos = torch.arange(SEQ).expand(GLOBAL, SEQ)
    return [Batch(tokens=ids[i:i + MICRO, :-1], labels=ids[i:i + MICRO, 1:], loss_mask=mask[i:i + MICRO],
                  position_ids=pos[i:i + MICRO], segments=segments[i:i + MICRO],
                  source=torch.zeros(MICRO, dtype=torch.long))
            for i in range(0, GLOBAL, MICRO)]


def main(out: str, *overrides: str) -> None:
    settings = OmegaConf.from_dotlist(list(overrides))
    parallel = OmegaConf.merge(OmegaConf.structured(ParallelConfig(device="cpu")), settings.get("parallel", {}))
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig(num_layers=4, hidden_size=32, num_heads=4,
                                                                 seq_length=SEQ)), settings.get("model", {}))
    precision = OmegaConf.merge(OmegaConf.structured(PrecisionConfig()), settings.get("precision", {}))
    if precision.dtype == "fp16":  # DeepSpeed's CPU accelerator says it has no fp16; torch's CPU kernels run it
        from deepspeed.accelerator import get_accelerator  # (the adaptation tests/unit/test_fp16.py names)

        get_accelerator().is_fp16_supported = lambda: True
    layout = init_distributed(parallel)
    model = build_model(model_cfg, vocab_size=VOCAB, dtype=precision.dtype, device=layout.device, seed=3,
                        parallel=parallel)
    train = OmegaConf.structured(TrainConfig(global_batch_size=GLOBAL, micro_batch_size=MICRO, max_steps=2))
    engine = build_engine(model, optim=OmegaConf.structured(OptimConfig(grad_clip=0.0)), train=train,
                          parallel=parallel, precision=precision, layout=layout)
    grads, update = {}, engine._ds.optimizer.step

    def capture(*args, **kwargs):  # the gradients the update sees, after every reduction (ZeRO-0: p.grad; fp16:
        for name, p in engine.module.named_parameters():  # times the loss scale, divided out here)
            if not is_stage_copy(p):
                grads[single_process_name(engine.module, name, p)] = p.grad.detach().float() / (scale or 1.0)
        return update(*args, **kwargs)

    scale = state.loss_scale(engine._ds)

    engine._ds.optimizer.step = capture
    result = train_step(engine, batches(), layout)
    grads["__loss__"] = result.loss.detach().float().reshape(1)
    grads["__grad_norm__"] = torch.as_tensor(float(result.grad_norm)).reshape(1)
    save_file(grads, f"{out}.rank{layout.rank}.safetensors")
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
