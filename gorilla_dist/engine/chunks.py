"""One model chunk of an interleaved pipeline rank, as megatron-core 0.16.1 would have built it alone (see
versions.py): what `chunk_view` changes on a GPTModel that holds all of its rank's chunks (model/spec.py GPT).

megatron's own interleaving builds one GPTModel per chunk (`vp_stage`), each with its own module names; we keep
one model per rank, whose decoder holds every chunk's layers under their global layer numbers, so that names,
seeds, checkpoints and adapters are those of every other layout. For the duration of a chunk's forward (and
its backward: full activation recompute looks its layers up again by index) the model is made to look like
that chunk alone:
- `GPTModel.pre_process` / `TransformerBlock.pre_process`: the embeddings run on the pipeline's first chunk only
  (the others read `set_input_tensor`'s input);
- `GPTModel.post_process` / `TransformerBlock.post_process`, and `TransformerBlock.final_layernorm` set to None
  on every chunk but the last: the final norm, output layer and loss on the pipeline's last chunk only;
- `TransformerBlock.layers` (a ModuleList of the chunk's layers) and `num_layers_per_pipeline_rank` (the
  count full recompute iterates over).
Everything is put back on exit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def chunk_view(model, sizes: list[int], c: int):
    """`model` (a GPTModel holding consecutive runs of `sizes` layers, one run per chunk) as chunk `c`."""
    decoder, last = model.decoder, len(sizes) - 1
    saved = (model.pre_process, model.post_process, decoder.pre_process, decoder.post_process, decoder.layers,
             decoder.final_layernorm, decoder.num_layers_per_pipeline_rank)
    start = sum(sizes[:c])
    model.pre_process = decoder.pre_process = saved[0] and c == 0
    model.post_process = decoder.post_process = saved[1] and c == last
    decoder.layers = torch.nn.ModuleList(list(saved[4])[start:start + sizes[c]])
    decoder.num_layers_per_pipeline_rank = sizes[c]
    if c != last:
        decoder.final_layernorm = None
    model.viewing = True
    try:
        yield
    finally:
        model.pre_process, model.post_process, decoder.pre_process, decoder.post_process = saved[:4]
        decoder.layers, decoder.final_layernorm, decoder.num_layers_per_pipeline_rank = saved[4:]
        model.viewing = False
