"""Prepared datasets → blended, shuffled, packed samples → this rank's micro-batches.

The global sample sequence is a pure function of (seed, sources, weights): sample i comes from the
source `Blend` assigns it, and is that source's k-th sample, i.e. sample permute(k mod n, (seed, source,
epoch)) of its packed windows. Global batch t is samples [t*G, (t+1)*G); data-parallel rank r takes
the r-th contiguous slice of it. So the state is a position and per-source counts, and a run resumed
on another data-parallel size continues the same global sequence.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from gorilla_dist.config import DataConfig, RunConfig, TrainConfig
from gorilla_dist.data.dataset import ExampleSpan, Span, TokenDataset
from gorilla_dist.data.order import Blend, permute
from gorilla_dist.data.tokenizer import load_tokenizer, same_tokenizer
from gorilla_dist.errors import DataError
from gorilla_dist.kernels.limits import BIDIRECTIONAL

BUNDLED = "tinyshakespeare.txt"


def bundled_corpus() -> Path:
    return Path(str(resources.files("gorilla_dist.data").joinpath(BUNDLED)))


@dataclass
class Batch:
    """One micro-batch. tokens, labels, position_ids: (b, s) int64; loss_mask: (b, s) float32 (0 on
    padding, on prompts of instruction data, and wherever the target belongs to another document than
    the input); segments: (b, s) int32, the document each token belongs to — attention stays inside a
    document (the attention modules build the mask on the device from it) — or None for plain causal
    attention over the whole sample; source: (b,); classes: (b, s) int64, labelled examples' class ids at
    the position the classification head reads, -1 elsewhere (None without labelled data); objective:
    (b,) int64, each training sample's objective (train.objectives; None: a single objective, and on
    validation batches, where every objective scores every sample); spans: see below."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor | None
    source: torch.Tensor
    classes: torch.Tensor | None = None
    objective: torch.Tensor | None = None
    spans: torch.Tensor | None = None
    """(b, s) int8: the contrastive objective's two halves of a sample, 1 and 2 (objectives.contrastive_view)."""
    scored: torch.Tensor | None = None
    """(b,) bool on validation batches: False for the padding rows that fill the last micro-batches up to
    equal sizes on every rank (their loss mask is 0 and they count for no objective); None: every row."""
    doc_lengths: torch.Tensor | None = None
    """(b, D) int32 with segments that are plain documents (each a contiguous run of tokens, no prefix-LM
    input, no shared prefix): each row's document lengths in order, 0-padded to the batch's most documents;
    flash-attn's varlen kernel runs them without an s x s mask (kernels/dense.packed_documents). None otherwise."""

    def to(self, device) -> Batch:
        """On the device. To a GPU from pinned (page-locked) host memory, so the copy is asynchronous: from
        pageable memory CUDA stages it and the host waits for the copy, behind the work queued before it."""
        pin = torch.device(device).type == "cuda"
        return Batch(*(None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=True)
                       for t in self.__dict__.values()))

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self.__dict__.values()))


def eod_segments(windows: np.ndarray, eod: int) -> np.ndarray:
    """(b, s+1) token ids → (b, s+1) document number inside each window: <eod> ends its document, so
    the token after it starts the next one (Megatron's reset_position_ids / reset_attention_mask)."""
    seg = np.zeros(windows.shape, dtype=np.int32)
    np.cumsum(windows[:, :-1] == eod, axis=1, out=seg[:, 1:])
    return seg


def doc_lengths(seg: np.ndarray | None) -> torch.Tensor | None:
    """Batch.doc_lengths of (b, s) segment ids, or None when they are not plain documents in order."""
    if (seg is None or seg.size == 0 or seg.min() < 0 or seg.max() >= BIDIRECTIONAL
            or (np.diff(seg, axis=1) < 0).any()):
        return None
    lengths = np.stack([np.bincount(row, minlength=int(seg.max()) + 1) for row in seg])  # (b, D); empty ids: 0
    return torch.from_numpy(lengths.astype(np.int32))


def pack(windows: np.ndarray, valid: np.ndarray, sources: np.ndarray, *, eod: int, reset_at_eod: bool,
         segments: np.ndarray | None = None, targets: np.ndarray | None = None,
         classes: np.ndarray | None = None) -> Batch:
    """windows (b, s+1) token ids with `valid` real tokens each → a Batch of inputs and shifted targets.

    segments (b, s+1): the document of each token (packed examples), or derived from <eod> when
    reset_at_eod; position ids then restart at each document, attention stays inside it, and no target
    crosses a boundary. targets (b, s+1) 0/1: which tokens may be predicted (instruction data's outputs);
    None: all of them. classes (b, s+1): see Batch."""
    b, s = windows.shape[0], windows.shape[1] - 1
    tokens, labels = windows[:, :-1], windows[:, 1:]
    loss_mask = np.arange(s)[None, :] < (valid[:, None] - 1)
    if targets is not None:
        loss_mask &= targets[:, 1:].astype(bool)
    if segments is None and reset_at_eod:
        segments = eod_segments(windows, eod)
    pos = np.broadcast_to(np.arange(s), (b, s))
    seg = None
    if segments is not None:
        doc = np.where(segments >= BIDIRECTIONAL, segments - BIDIRECTIONAL, segments)  # (a prefix-LM's input: its doc)
        loss_mask &= doc[:, :-1] == doc[:, 1:]  # the next document is not predictable from this one
        seg = np.ascontiguousarray(segments[:, :-1], dtype=np.int32)
        starts = np.zeros((b, s), dtype=np.int64)  # where each position's document starts
        starts[:, 1:] = np.where(doc[:, 1:-1] != doc[:, :-2], np.arange(1, s), 0)
        pos = np.arange(s)[None, :] - np.maximum.accumulate(starts, axis=1)
    return Batch(torch.from_numpy(np.ascontiguousarray(tokens)), torch.from_numpy(np.ascontiguousarray(labels)),
                 torch.from_numpy(loss_mask.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(pos)),
                 None if seg is None else torch.from_numpy(seg), torch.from_numpy(sources),
                 None if classes is None else torch.from_numpy(np.ascontiguousarray(classes[:, :-1])),
                 doc_lengths=doc_lengths(seg))


class ShardData:
    """Blended training samples and fixed validation samples over prepared datasets."""

    def __init__(self, datasets: list[TokenDataset], weights: list[float], tokenizer, *, seq_length: int,
                 micro_batch_size: int, global_batch_size: int, dp: int, dp_rank: int, seed: int,
                 val_fraction: float, reset_at_eod: bool = False, pack: bool = True, truncate: bool = False,
                 objectives: list | None = None, device: torch.device | str = "cpu"):
        self.datasets, self.weights, self.tokenizer = datasets, list(weights), tokenizer
        self.vocab_size, self.eod = tokenizer.vocab_size, tokenizer.eod
        self.seq, self.micro, self.global_batch = seq_length, micro_batch_size, global_batch_size
        self.dp, self.dp_rank, self.seed, self.reset, self.device = dp, dp_rank, seed, reset_at_eod, device
        self.one_per_sample = not pack
        self._pool, self._ahead, self._handed_out = None, None, None  # next_train_batches' batch built ahead
        self.train, self.val = [], []
        self.notes: list[str] = []  # what the loader did that a user should know (printed once by the loop)
        for d in datasets:
            train, val = d.split(val_fraction)
            for name, (a, b), spans in (("train", train, self.train), ("validation", val, self.val)):
                if d.examples:
                    span = ExampleSpan(d, a, b, seq_length, pack=pack, truncate=truncate)
                    if span.truncated:
                        self.notes.append(f"{d.path}: {span.truncated} {name} examples longer than model.seq_length"
                                          f" + 1 = {seq_length + 1} tokens were truncated (data.truncate=true)")
                else:
                    span = Span(d, a, b, seq_length)
                if span.samples == 0 and (name == "train" or val_fraction > 0):
                    raise DataError(f"{d.path}: the {name} split has {b - a} tokens, too few for one sample of "
                                    f"model.seq_length={seq_length}; use more data or adjust data.val_fraction")
                spans.append(span)
        names = {tuple(d.label_names) for d in datasets if d.label_names is not None}
        if len(names) > 1:
            raise DataError(f"data.sources have different label classes: {[list(n) for n in names]}; blend only "
                            "labelled datasets with the same classes")
        self.label_names = list(names.pop()) if names else None
        """The class names (in id order) of the labelled datasets; None when there are none."""
        self.blend = Blend(self.weights)
        from gorilla_dist.objectives import bind

        self.objective_items = bind(objectives or [])
        """The run's objectives (gorilla_dist/objectives): the loader asks each what it does to its samples."""
        weights = [o.options.weight for o in self.objective_items]
        self.objectives = Blend(weights) if len(weights) > 1 else None
        """Which objective each training sample serves, or None for one."""
        self.corrupting = [o for o in self.objective_items if o.input_to_target]  # input -> target, token level
        self.paired = any(o.pairs_across_ranks for o in self.objective_items)
        if self.corrupting:
            from gorilla_dist.data.tokenizer import OBJECTIVE_TOKENS

            if tuple(getattr(tokenizer, "specials", ())) != OBJECTIVE_TOKENS:  # (one tokenizer for all sources)
                names = sorted({o.name for o in self.corrupting})
                need = "needs" if len(names) == 1 else "need"
                raise DataError(f"train.objectives: {' and '.join(names)} {need} the objectives' "
                                f"special tokens (sentinels, mode tokens, separator), which {datasets[0].path} was "
                                "prepared without; prepare it again with python -m gorilla_dist.data.prepare ... "
                                "special_tokens=objectives")
        self._val_cache: dict[tuple, list[Batch]] = {}

    def sources_fingerprint(self) -> list:
        return [[d.meta["index"]["sha256"], w] for d, w in zip(self.datasets, self.weights)]

    def samples(self, spans: list[Span], sources: np.ndarray, index: np.ndarray, *, shuffle: bool,
                denoise: dict[int, np.ndarray] | None = None) -> Batch:
        """The samples `index` of each sample's source (epochs wrap; shuffled per epoch) as one Batch.
        denoise: {objective index: rows (bool)}: those rows rewritten into input + target by that objective
        (its `corrupt`; objectives/denoise.py), seeded by (run.seed, source, index): the same tokens whatever
        the layout or the resume point."""
        picks = np.empty(len(index), dtype=np.int64)
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            epoch, j = np.divmod(index[rows], spans[s].samples)
            if shuffle:
                for e in np.unique(epoch):
                    at = epoch == e
                    j[at] = permute(j[at], spans[s].samples, (self.seed, int(s), int(e)))
            picks[rows] = j
        n, width = len(index), self.seq + 1
        windows = np.empty((n, width), dtype=np.int64)
        examples = np.array([spans[s].examples for s in sources], dtype=bool)
        noisy = denoise and any(rows.any() for rows in denoise.values())
        if not examples.any() and not noisy:
            valid = np.array([spans[s].window(j, windows[r]) for r, (s, j) in enumerate(zip(sources, picks))])
            return pack(windows, valid, sources, eod=self.eod, reset_at_eod=self.reset)
        # instruction examples: per-token example numbers and loss masks (text rows: one document, or
        # documents split at <eod> with reset_at_eod; every token a target)
        segments, targets = np.zeros((n, width), dtype=np.int32), np.ones((n, width), dtype=np.uint8)
        classes = np.full((n, width), -1, dtype=np.int64) if self.label_names is not None else None
        valid = np.array([spans[s].window(j, windows[r], segments[r], targets[r],
                                          None if classes is None else classes[r]) if spans[s].examples
                          else spans[s].window(j, windows[r]) for r, (s, j) in enumerate(zip(sources, picks))])
        if self.reset and not examples.all():
            segments[~examples] = eod_segments(windows[~examples], self.eod)
        if noisy:
            keys = [(self.seed, int(s), int(i)) for s, i in zip(sources, index)]
            for k, rows in denoise.items():
                self.objective_items[k].corrupt(self, windows, valid, segments, targets, rows, keys)
        elif self.one_per_sample and not self.reset:  # one example, then padding: causal attention keeps them apart
            segments = None
        return pack(windows, valid, sources, eod=self.eod, reset_at_eod=False, segments=segments, targets=targets,
                    classes=classes)

    def _rows(self, k: int, objective: np.ndarray | None, mine, view, per_rank: int) -> np.ndarray:
        """(per_rank,) bool: the samples objective k (its index in train.objectives) transforms. view:
        "train", or on validation None (none) or k (all of them, for that objective's evaluation)."""
        if view != "train":
            return np.full(per_rank, view == k)
        return objective[mine] == k if objective is not None else np.full(per_rank, True)

    def _rank_batches(self, spans, sources, index, *, shuffle: bool, objective: np.ndarray | None = None,
                      view=None, n_real: int | None = None) -> list[Batch]:
        """This rank's micro-batches of the samples (sources, index). n_real: only the first n_real samples
        (in global order) count; the rest pad the batch (Batch.scored)."""
        per_rank = len(index) // self.dp
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        if self.paired:  # micro-batch i of all ranks = the i-th consecutive part of the batch, whatever dp is:
            # the pairs across ranks (contrastive negatives, gathered per micro-batch) are the same samples
            mine = np.arange(len(index)).reshape(-1, self.dp, self.micro)[:, self.dp_rank].reshape(-1)
        denoise = {o.index: self._rows(o.index, objective, mine, view, per_rank) for o in self.corrupting}
        batch = self.samples(spans, sources[mine], index[mine], shuffle=shuffle, denoise=denoise)
        if objective is not None:
            batch.objective = torch.from_numpy(objective[mine])
        for o in self.objective_items:  # training: the objective's samples; validation: its view, all of them
            batch = o.view(batch, self._rows(o.index, objective, mine, view, per_rank), self.eod)
        if n_real is not None:
            scored = np.arange(len(index))[mine] < n_real
            batch.loss_mask[~scored] = 0
            if batch.classes is not None:
                batch.classes[~scored] = -1
            batch.scored = torch.from_numpy(scored)
        batch = batch.to(self.device)
        return [batch[i:i + self.micro] for i in range(0, per_rank, self.micro)]

    def next_train_batches(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch. The one after it is built meanwhile, in a
        thread (reading the shards, packing, copying to the device), while the step runs; the loader's
        state (state_dict) stays that of the batches handed out."""
        if self._ahead is None:
            batches = self._build_train()
        else:
            batches = self._ahead.result()  # (a DataError raised while building it is raised here)
        self._handed_out = self.state_dict(live=True)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="gorilla_dist-prefetch")
        self._ahead = self._pool.submit(self._build_train)
        return batches

    def _build_train(self) -> list[Batch]:
        sources, index = self.blend.take(self.global_batch)
        objective = self.objectives.take(self.global_batch)[0] if self.objectives is not None else None
        return self._rank_batches(self.train, sources, index, shuffle=True, objective=objective, view="train")

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel() or self._ahead.exception()  # (let a running build finish, ignore its outcome)
        self._ahead, self._handed_out = None, None

    def val_batches(self, n_samples: int, view: int | None = None) -> list[Batch]:
        """The same n_samples validation samples at every evaluation (the blend from its start, unshuffled),
        whatever the layout: split over the data-parallel ranks in micro-batches, the last ones padded with
        rows that count for nothing (Batch.scored), so every rank runs the same number of forwards (ZeRO-3
        and expert parallelism communicate inside them). view=k: every sample prepared for objective k (its
        index in train.objectives): contrastive halves, denoiser corruption."""
        if (n_samples, view) not in self._val_cache:
            per = self.micro * self.dp
            sources, index = Blend(self.weights).take(-(-n_samples // per) * per)
            self._val_cache[(n_samples, view)] = self._rank_batches(self.val, sources, index, shuffle=False, view=view,
                                                                    n_real=n_samples)
        return self._val_cache[(n_samples, view)]

    def state_dict(self, live: bool = False) -> dict:
        """Where the training sample sequence is: after the batches handed out (a batch built ahead is not
        counted; `live`: the blend's own position, for next_train_batches)."""
        if self._handed_out is not None and not live:
            return self._handed_out
        state = {"blend": self.blend.state_dict(), "seed": self.seed, "sources": self.sources_fingerprint()}
        if self.objectives is not None:
            state["objectives"] = {"weights": self.objectives.weights, **self.objectives.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        if "blend" not in state:
            raise DataError("the checkpoint's data position comes from an older data loader; start a new run.dir")
        if int(state["seed"]) != self.seed:
            raise DataError(f"the checkpoint's data order was made with run.seed={state['seed']}, this run has "
                            f"{self.seed}: resuming would not continue the same sample sequence; keep the seed "
                            "or start a new run.dir")
        if state["sources"] != self.sources_fingerprint():
            raise DataError("the checkpoint's data order was made from other data.sources (datasets or weights) "
                            "than this run's; resuming would not continue the same sample sequence; keep the "
                            "sources or start a new run.dir")
        saved = state.get("objectives")
        theirs, mine = (saved["weights"] if saved else None), (self.objectives.weights if self.objectives else None)
        if theirs != mine:
            raise DataError(f"the checkpoint's samples were assigned to objectives with weights {theirs}, this "
                            f"run's train.objectives give {mine}; resuming would "
                            "not continue the same sequence; keep train.objectives or start a new run.dir")
        self.blend.load_state_dict(state["blend"])
        if self.objectives is not None:
            self.objectives.load_state_dict(saved)


def _open_sources(d: DataConfig, layout) -> list[TokenDataset]:
    from gorilla_dist.parallel import on_main

    paths = [s.path for s in d.sources]

    def verify() -> None:  # rank 0 verifies checksums (reads everything once); the others check sizes
        for p in paths:
            TokenDataset(p, verify=d.verify)

    on_main(verify, layout)
    return [TokenDataset(p, verify="size") for p in paths]


def _prepare_in_run(d: DataConfig, run_dir: Path, layout, *, special_tokens: str = "none") -> list[TokenDataset]:
    from gorilla_dist.data.writer import PrepareArgs, prepare
    from gorilla_dist.parallel import on_main

    out = run_dir / "data"
    args = PrepareArgs(input=[str(d.path or bundled_corpus())], output=str(out), tokenizer=d.tokenizer,
                       sample_by=d.sample_by, file_identity="sha256", workers=1, progress=False,
                       special_tokens=special_tokens)
    def prepare_once() -> None:
        prepare(args, new_output_hint="this run.dir was trained on them; use a new run.dir for other data.path / "
                                      "data.tokenizer / data.sample_by")

    on_main(prepare_once, layout)
    return [TokenDataset(out, verify="size")]


def build_data(d: DataConfig, *, run: RunConfig, train: TrainConfig, seq_length: int, layout) -> ShardData:
    """Open d.sources (or prepare d.path into run.dir/data), check they share one tokenizer, record it
    as run.dir/tokenizer.json, and build the loader for this rank: samples of seq_length tokens, the
    batch sizes of `train`, the order seeded by run.seed."""
    from gorilla_dist.parallel import on_main

    run_dir = Path(run.dir)
    from gorilla_dist.objectives import bind

    specials = "objectives" if any(o.input_to_target for o in bind(train.objectives)) else "none"
    datasets = _open_sources(d, layout) if d.sources else _prepare_in_run(d, run_dir, layout, special_tokens=specials)
    digests = {ds.meta["tokenizer"]["sha256"] for ds in datasets}
    if len(digests) > 1:
        kinds = [f"{ds.path} ({ds.meta['tokenizer']['kind']}, {ds.vocab_size} ids)" for ds in datasets]
        raise DataError(f"data.sources were prepared with different tokenizers: {kinds}; blend only datasets "
                        "prepared with the same tokenizer")
    tok_file, run_tok = datasets[0].path / "tokenizer.json", run_dir / "tokenizer.json"

    def record_tokenizer():
        if run_tok.is_file() and not same_tokenizer(run_tok, tok_file):
            raise DataError(f"{run_tok}: this run.dir was trained with another tokenizer than {tok_file}'s; "
                            "use a new run.dir")
        shutil.copyfile(tok_file, run_tok)

    on_main(record_tokenizer, layout)
    weights = [s.weight for s in d.sources] if d.sources else [1.0]
    return ShardData(datasets, weights, load_tokenizer(tok_file), seq_length=seq_length,
                     micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size,
                     dp=layout.dp, dp_rank=layout.dp_rank, seed=run.seed, val_fraction=d.val_fraction,
                     reset_at_eod=d.reset_at_eod, pack=d.pack, truncate=d.truncate, device=layout.device,
                     objectives=list(train.objectives))
