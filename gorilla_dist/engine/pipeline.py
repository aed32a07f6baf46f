"""Pipeline parallelism: the TrainEngine of one pipeline stage (parallel.pp > 1).

Each rank holds a stage of the model (model/spec.py builds it: megatron-core's GPTModel with pre_process /
post_process and the stage's own layers, under their global indices) inside a DeepSpeed engine of its own,
as every other layout (ZeRO-0/1 over the stage's data-parallel ranks, precision, clipping). A step runs the
rank's micro-batches through the stages in the 1F1B schedule (PipeDream-Flush, as megatron-core's
`forward_backward_pipelining_without_interleaving`): stage r of p first runs min(p - r - 1, m) forwards, then
alternates one forward and one backward, then drains the remaining backwards, so at most p - r micro-batches'
activations are alive on it at a time (not m).

Why our own loop and not megatron's schedule or DeepSpeed's PipelineEngine: megatron's schedule calls
`torch.autograd.backward` itself, around DeepSpeed's per-micro-batch accounting (the accumulation counter,
the fp32 gradient accumulation of bf16 ZeRO-1), and allocates on CUDA; DeepSpeed's PipelineEngine needs a
flat PipelineModule and its own process groups (no megatron mpu). Here every backward is DeepSpeed's: the
last stage's of the loss (divided by the accumulation steps, as without stages), the others' of
(output * gradient from the next stage).sum() without that division (its gradient with respect to the
output is exactly the received gradient). At the step's end the tied embeddings' gradients are summed over
megatron's embedding group (first and last stage), then DeepSpeed reduces over the data-parallel ranks and
steps. The stages exchange activations and gradients with point-to-point sends between neighbours
(torch.distributed batch_isend_irecv, on gloo and NCCL alike: megatron's P2PCommunicator allocates its
receive buffers on CUDA and synchronizes CUDA).

The loss (of the last stage) reaches every stage with one all-reduce over the pipeline group, on the device;
the gradient norm is summed over tensor- and pipeline-parallel ranks (the `mpu`'s model-parallel group), so
every stage takes the same skip decision.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from gorilla_dist.engine import moe, state
from gorilla_dist.engine.deepspeed_engine import DeepSpeedEngine
from gorilla_dist.engine.protocol import StepResult


class StageLinks:
    """This rank's neighbours in its pipeline, and the point-to-point exchange with them."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.group = ps.get_pipeline_model_parallel_group()
        self.rank, self.size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.prev, self.next = ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()

    def exchange(self, *, send_next=None, send_prev=None, recv_prev=None, recv_next=None):
        """Sends the given tensors and receives tensors of the given (shape, dtype, device) from the previous /
        next stage, all at once; returns (from previous, from next)."""
        ops, got = [], {}
        for tensor, peer in ((send_next, self.next), (send_prev, self.prev)):
            if tensor is not None:
                ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer, self.group))
        for like, peer, key in ((recv_prev, self.prev, "prev"), (recv_next, self.next, "next")):
            if like is not None:
                got[key] = torch.empty(like[0], dtype=like[1], device=like[2])
                ops.append(dist.P2POp(dist.irecv, got[key], peer, self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return got.get("prev"), got.get("next")


class PipelineEngine(DeepSpeedEngine):
    """The TrainEngine of one pipeline stage (see the module's docstring). Its state (full_state,
    local_state, load_full_state, check_fits) is the stage's parameters under their single-process names."""

    def __init__(self, ds_engine, layout, router_stats=None):
        super().__init__(ds_engine, router_stats)
        self.links = StageLinks()
        config = ds_engine.module.config
        self._hidden, self._dtype = config.hidden_size, config.params_dtype
        self._sp_split = config.tensor_model_parallel_size if config.sequence_parallel else 1
        self.chunks = len(ds_engine.module.chunk_sizes or [()])  # model chunks on this rank (interleaved: > 1)
        ds_engine.enable_backward_allreduce = False  # reduced once per step, after the tied embeddings' sum
        self._reduce = layout.dp > 1 or ds_engine.zero_optimization()
        # (megatron marks the tied copies on the first and the last stage only)
        self._tied = [p for p in ds_engine.module.parameters() if getattr(p, "shared_embedding", False)]

    # --- the stage's forward ---
    def _activation(self, tokens: torch.Tensor):
        """(shape, dtype, device) of the activations a stage passes on for input ids `tokens` (b, s)."""
        b, s = tokens.shape
        return (s // self._sp_split, b, self._hidden), self._dtype, tokens.device

    def _ends(self, c: int) -> tuple[bool, bool]:
        """Whether model chunk `c` of this rank is the pipeline's first (embeddings) / last (loss)."""
        return self.links.first and c == 0, self.links.last and c == self.chunks - 1

    def stage_forward(self, args: tuple, kwargs: dict, last: Callable):
        """Forward only, one batch through this rank's chunks in turn: the input from the previous stage (the
        first: the ids in args), then on the last chunk of the last stage `last()` (the caller's loss or
        logits, which calls the model) and its result returned; the others send their output to the next
        stage (with interleaving, the last rank's to the first) and this returns None."""
        for c in range(self.chunks):
            first, last_chunk = self._ends(c)
            # (None on the first chunk: megatron takes the rotary length from a stale input otherwise)
            x = None if first else self.links.exchange(recv_prev=self._activation(args[0]))[0]
            self._ds.module.set_input_tensor(x)
            with self._ds.module.chunk_view(c):
                if last_chunk:
                    return last()
                out = self._ds(*args, **kwargs)
            self.links.exchange(send_next=out)
        return None

    # --- TrainEngine ---
    def step(self, micro_batches, loss_fn, *, probe=None) -> StepResult:
        """One optimizer step over this rank's micro-batches in the 1F1B or the interleaved schedule."""
        from gorilla_dist.loss import packed

        ds, m = self._ds, len(micro_batches)
        applied_before = ds.lr_scheduler.applied.clone()
        total = torch.zeros((), device=micro_batches[0].tokens.device)
        scale = state.loss_scale(ds)  # fp16: the loss scale (a power of 2) the last stage's backward multiplies by
        if self.router_stats is not None:  # the aux losses' backward factor, on every stage (moe.py 1)
            moe.set_aux_loss_scale((scale or 1.0) / ds.gradient_accumulation_steps(), total.device)
        live = [deque() for _ in range(self.chunks)]  # per chunk: (input, output) awaiting their backward, oldest first

        def forward(i: int, c: int, x):
            """Micro-batch i through chunk c (x: its input from the previous stage, None on the first);
            returns the output to send on (None from the last chunk of the last stage)."""
            nonlocal total
            batch = micro_batches[i]
            first, last = self._ends(c)
            if not first:
                x.requires_grad_()
            ds.module.set_input_tensor(x)  # None on the first chunk (as in stage_forward)
            with ds.module.chunk_view(c):
                if last:
                    out = loss_fn(self, batch)
                    total += out.detach().float()
                else:
                    out = ds(batch.tokens, batch.position_ids, batch.segments, **packed(batch))
            live[c].append((x, out))
            return None if last else out

        def backward(c: int, grad, count: bool):
            """The oldest outstanding backward of chunk c (grad: the gradient of its output from the next
            stage, None on the last); `count`: the micro-batch's last backward on this rank, not the step's
            last (DeepSpeed counts it towards the accumulation). Returns the gradient to send back."""
            x, out = live[c].popleft()
            with ds.module.chunk_view(c):
                if grad is None:
                    ds.backward(out)
                else:  # d/d(out) of (out * grad).sum() is grad; the loss already carries the accumulation factor
                    # and, with fp16, the loss scale, which DeepSpeed's backward applies again: divided out here
                    # (exactly: a power of 2), in fp32 so that the product cannot overflow
                    term = (out.float() * grad.float()).sum() / scale if scale else (out * grad).sum()
                    ds.backward(term, scale_wrt_gas=False)
            if count:
                ds.step()  # counts the micro-batch (the update waits for the step's end)
            return None if x is None else x.grad

        shape = self._activation(micro_batches[0].tokens)
        # the probe (first step) measures the whole schedule: a stage holds several micro-batches' activations
        with probe.micro_batch() if probe else nullcontext():
            if self.chunks == 1:
                self._one_f_one_b(m, shape, forward, backward)
            else:
                self._interleaved(m, shape, forward, backward)
        self._reduce_and_update(probe)
        stats = None
        if self.router_stats is not None:
            moe.update_expert_bias(ds.module)
            stats = self.router_stats.take(m)
        return StepResult(loss=self._from_last_stage(total / m), grad_norm=state.unscaled_grad_norm(ds, scale),
                          skipped=ds.lr_scheduler.applied == applied_before, moe=stats, loss_scale=scale)

    def _one_f_one_b(self, m: int, shape, forward, backward) -> None:
        """1F1B: warm-up forwards, one forward and one backward in turn, the remaining backwards (the exchanges
        are megatron-core's: a stage sends its output and receives the gradient for its next backward in one
        exchange, sends an input gradient and receives its next input in another)."""
        links = self.links
        warmup = min(links.size - links.rank - 1, m)
        previous = None if links.first else shape
        following = None if links.last else shape
        for i in range(warmup):
            x, _ = links.exchange(recv_prev=previous)
            links.exchange(send_next=forward(i, 0, x))  # (the last stage has no warm-up)
        x = links.exchange(recv_prev=previous)[0] if warmup < m else None
        for j in range(m - warmup):
            out = forward(warmup + j, 0, x)
            _, grad = links.exchange(send_next=out, recv_next=following)
            grad_in = backward(0, grad, j < m - 1)
            last_steady = j == m - warmup - 1
            x, _ = links.exchange(send_prev=grad_in, recv_prev=None if last_steady else previous)
        for j in range(m - warmup, m):
            _, grad = links.exchange(recv_next=following)
            links.exchange(send_prev=backward(0, grad, j < m - 1))

    def _interleaved(self, m: int, shape, forward, backward) -> None:
        """megatron-core's interleaved 1F1B (forward_backward_pipelining_with_interleaving, its exchanges
        without overlap), micro-batches in groups of pp: the forwards run group by group, each group through
        chunk 0, then chunk 1, ...; the backwards in the same order with the chunks reversed. Rank r warms
        up with 2 (pp - r - 1) + (v - 1) pp forwards, then runs one forward and one backward per exchange
        (sending both results, receiving the next input and output gradient together), then drains."""
        links, v, p = self.links, self.chunks, self.links.size
        total = m * v
        order = [(i, c) for g in range(0, m, p) for c in range(v) for i in range(g, min(g + p, m))]
        warmup = min(total, 2 * (p - links.rank - 1) + (v - 1) * p)
        inputs, grads = [deque() for _ in range(v)], [deque() for _ in range(v)]  # received, per chunk, in order

        def chunk(k: int, forwards: bool) -> int:
            c = order[k % total][1]
            return c if forwards else v - 1 - c

        def arriving(k: int, forwards: bool) -> tuple[bool, int]:
            """Whether the exchange after this rank's k-th forward (backward) receives an input (gradient), and
            for which chunk (megatron's recv_tensor_from_previous_stage): the first rank's inputs come from the
            last rank's previous chunk, p - 1 forwards behind it (for gradients: the other way round)."""
            if not (links.first if forwards else links.last):
                return True, chunk(k + 1, forwards)
            c = chunk(k - (p - 1) if k >= p - 1 else k + 1, forwards)
            step = 1 if forwards else -1
            return k >= p - 1 and c != (v - 1 if forwards else 0), c + step

        def run_forward(k: int):
            i, c = order[k]
            return forward(i, c, None if self._ends(c)[0] else inputs[c].popleft())

        def run_backward(k: int):
            c = chunk(k, False)
            grad = None if self._ends(c)[1] else grads[c].popleft()
            return backward(c, grad, c == 0 and k < total - 1)

        def receive(got, forwards: bool, k: int, wanted: bool):
            if wanted:
                (inputs if forwards else grads)[arriving(k, forwards)[1]].append(got)

        if not links.first:
            inputs[0].append(links.exchange(recv_prev=shape)[0])
        for k in range(warmup):
            recv_prev = arriving(k, True)[0] and k < total - 1
            out = run_forward(k)
            recv_next = k == warmup - 1 and warmup < total and not links.last
            x, g = links.exchange(send_next=out, recv_prev=shape if recv_prev else None,
                                  recv_next=shape if recv_next else None)
            receive(x, True, k, recv_prev)
            if recv_next:
                grads[v - 1].append(g)
        for k in range(total - warmup):
            out, grad_in = run_forward(k + warmup), run_backward(k)
            recv_prev = arriving(k + warmup, True)[0] and k < total - warmup - 1
            recv_next = arriving(k, False)[0]
            x, g = links.exchange(send_next=out, send_prev=grad_in, recv_prev=shape if recv_prev else None,
                                  recv_next=shape if recv_next else None)
            receive(x, True, k + warmup, recv_prev)
            receive(g, False, k, recv_next)
        if warmup == total and not links.last:
            grads[v - 1].append(links.exchange(recv_next=shape)[1])
        for k in range(total - warmup, total):
            recv_next = arriving(k, False)[0] and k < total - 1
            _, g = links.exchange(send_prev=run_backward(k), recv_next=shape if recv_next else None)
            receive(g, False, k, recv_next)

    def _reduce_and_update(self, probe) -> None:
        """The step's end: tied embeddings summed over the embedding group, DeepSpeed's data-parallel
        reduction, the update."""
        ds = self._ds
        if self._tied:
            from megatron.core import parallel_state as ps

            bf16_optimizer = type(ds.optimizer).__name__ == "BF16_Optimizer"
            for p in self._tied:
                grad = getattr(p, "_hp_grad", None) if bf16_optimizer else p.grad
                if grad is not None:
                    dist.all_reduce(grad, group=ps.get_embedding_group())
        if self._reduce:
            ds.allreduce_gradients()
        if probe:
            probe.before_update()
        ds.step()
        if probe:
            probe.after_update()

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's `value` on every stage (the others contribute zeros): one all-reduce, on the device."""
        if not self.links.last:
            value = torch.zeros_like(value)
        dist.all_reduce(value, group=self.links.group)
        return value

    def evaluate_sums(self, batches, fn: Callable, width: int) -> torch.Tensor:
        """Forward only: the sum over `batches` of fn(self, batch) (a tuple of `width` 0-d float64 tensors, run
        on the last stage), on every stage."""
        from gorilla_dist.loss import packed

        sums = torch.zeros(width, dtype=torch.float64, device=batches[0].tokens.device)
        with torch.no_grad():
            for b in batches:
                out = self.stage_forward((b.tokens, b.position_ids, b.segments), packed(b),
                                         lambda b=b: torch.stack(fn(self, b)))
                if out is not None:  # (the last stage)
                    sums += out
        return self._from_last_stage(sums)

    def sampling_model(self):
        """A callable for inference.sample: the model's logits over the whole pipeline, on every stage."""
        return PipelineLogits(self)


class PipelineLogits:
    """What inference's Decoder calls (uncached): ids through every stage, the last stage's vocabulary-parallel
    logits broadcast to the pipeline, so every stage draws the same next token."""

    def __init__(self, engine: PipelineEngine):
        self.engine, self.module = engine, engine.module
        self.config = self.module.config

    @property
    def training(self) -> bool:
        return self.module.training

    def parameters(self):
        return self.module.parameters()

    def eval(self):
        self.module.eval()
        return self

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def __call__(self, ids, pos, mask, **kwargs):
        e = self.engine
        out = e.stage_forward((ids, pos, mask), kwargs, lambda: self.module(ids, pos, mask, **kwargs))
        if out is None:  # (a stage before the last: the logits arrive with the broadcast)
            vocab = self.module.vocab_size // self.config.tensor_model_parallel_size
            out = torch.empty((ids.shape[0], ids.shape[1], vocab), dtype=torch.float32, device=ids.device)
        else:
            out = out.float().contiguous()
        dist.broadcast(out, src=e.links.last_rank, group=e.links.group)
        return out
