"""What every architecture adapter shares: the weight-map rule, the codecs between our tensors and
transformers', the Adapter base class."""

from __future__ import annotations

from dataclasses import dataclass, field

from gorilla_dist.errors import ConfigError


TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` (single-process name) is the transformers tensors `theirs`, related by `codec`:
    same | transpose | qkv (megatron's fused rows <-> q, k, v) | gate_up (fc1 = [gate; up]) | qkv_packed and
    qkv_packed_t (GPT-2's c_attn [all q; all k; all v], the weight stored (in, out)) | vocab (embedding rows of
    the tokenizer's ids; padded rows on our side) | positions (learned positions, our first seq_length)."""

    ours: str
    theirs: tuple[str, ...]
    codec: str = "same"
    zeros: int | None = None
    """Export only: our model may lack this tensor (model.bias=false) while the architecture always has it:
    write zeros of this length."""


@dataclass
class Shapes:
    """What the codecs need of the model: head counts, vocabulary, context."""

    nh: int
    ng: int
    vocab_size: int
    padded_vocab: int = 0
    seq_length: int = 0


def split_qkv(t, nh: int, ng: int):
    """Megatron's fused QKV rows (per query group: its nh/ng query heads, then one key and one value head) ->
    the q, k, v rows of `t` (a weight, bias or LoRA B), each head's rows in order."""
    hd = t.shape[0] // (nh + 2 * ng)
    t = t.reshape(ng, nh // ng + 2, hd, *t.shape[1:])
    q, k, v = t[:, :-2], t[:, -2], t[:, -1]
    return tuple(x.reshape(-1, *t.shape[3:]) for x in (q, k, v))


def fuse_qkv(q, k, v, nh: int, ng: int):
    """The inverse of split_qkv."""
    import torch

    hd = q.shape[0] // nh
    q = q.reshape(ng, nh // ng, hd, *q.shape[1:])
    k, v = k.reshape(ng, 1, hd, *k.shape[1:]), v.reshape(ng, 1, hd, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[3:])


def encode(codec: str, t, s: Shapes) -> tuple:
    """Our tensor -> the transformers tensors (`theirs`, in order)."""
    import torch

    if codec == "same":
        return (t,)
    if codec == "transpose":
        return (t.T,)
    if codec == "qkv":
        return split_qkv(t, s.nh, s.ng)
    if codec == "gate_up":
        return tuple(t.chunk(2, dim=0))
    if codec in ("qkv_packed", "qkv_packed_t"):
        packed = torch.cat(split_qkv(t, s.nh, s.ng))
        return (packed.T if codec == "qkv_packed_t" else packed,)
    if codec == "vocab":
        return (t[:s.vocab_size],)
    if codec == "positions":
        return (t,)
    raise ValueError(f"unknown codec {codec!r}")


def decode(codec: str, ts: list, s: Shapes):
    """The transformers tensors -> our tensor (the inverse of encode)."""
    import torch

    if codec == "same":
        return ts[0]
    if codec == "positions":
        return ts[0][:s.seq_length]
    if codec == "transpose":
        return ts[0].T
    if codec == "qkv":
        return fuse_qkv(*ts, s.nh, s.ng)
    if codec == "gate_up":
        return torch.cat(ts)
    if codec in ("qkv_packed", "qkv_packed_t"):
        packed = ts[0].T if codec == "qkv_packed_t" else ts[0]
        return fuse_qkv(*packed.chunk(3), s.nh, s.ng)
    if codec == "vocab":
        t = ts[0]
        if t.shape[0] < s.vocab_size:
            raise ConfigError(f"checkpoint.init_from=hf: the model has {t.shape[0]} embedding rows, its tokenizer "
                              f"{s.vocab_size} ids")
        t = t[:s.vocab_size]
        return torch.cat([t, t.new_zeros(s.padded_vocab - t.shape[0], *t.shape[1:])])
    raise ValueError(f"unknown codec {codec!r}")


def refuse(source: str, why: str):
    raise ConfigError(f"checkpoint.init_from=hf:{source}: {why}; our model would compute something else, so it is "
                      "not imported")


def rope_base(config: dict, source: str, default: float = 10000.0) -> int:
    """The rotary base: `rope_theta`, or transformers 5's `rope_parameters` (plain rotary only)."""
    params = config.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        refuse(source, f"rope scaling {config.get('rope_scaling') or params} (only plain rotary positions are built)")
    theta = config.get("rope_theta") or params.get("rope_theta") or config.get("rotary_emb_base") or default
    return int(theta)


@dataclass
class Adapter:
    """An architecture: its names, its config, its weight map (see the module docstring)."""

    model_type: str
    """What export writes (config.json's model_type)."""
    hf_class: str
    """The causal-LM class (config.json's architectures)."""
    reads: tuple[str, ...] = ()
    """The model_types this adapter imports (besides model_type)."""
    layers: str = ""
    """transformers' prefix of the decoder layers (PEFT adapters name modules under it)."""
    peft: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """format=peft: our linear -> the transformers modules its rows become (empty: no PEFT export)."""

    def fields(self, config: dict, source: str) -> dict:
        """The fields of our ModelConfig that compute exactly what `config` (config.json) does."""
        raise NotImplementedError

    def config(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        """config.json for our model config `m` (without the tokens and dtype: `common`)."""
        raise NotImplementedError

    def rules(self, m) -> list[Rule]:
        """The weight map of a model of config `m`, every tensor once."""
        raise NotImplementedError

    def max_positions(self, config: dict) -> int | None:
        """Learned positions bound the context (None: they do not)."""
        return None

    def to_hf(self, m, w: dict, *, vocab_size: int) -> dict:
        """Our consolidated (single-process names) weights -> transformers' names. A classification head
        (`classifier.weight`) becomes *ForSequenceClassification's `score.weight`, in place of the LM head; a
        tied LM head is not written (transformers ties it on load)."""
        import torch

        s = Shapes(m.num_heads, m.num_query_groups or m.num_heads, vocab_size)
        out = {}
        for rule in self.rules(m):
            if rule.ours == "output_layer.weight" and "classifier.weight" in w:
                continue
            t = w.get(rule.ours)
            if t is None and rule.zeros is not None:
                t = torch.zeros(rule.zeros)
            out.update(zip(rule.theirs, encode(rule.codec, t, s)))
        if "classifier.weight" in w:
            out["score.weight"] = w["classifier.weight"]
        return out

    def from_hf(self, m, w: dict, *, vocab_size: int, padded_vocab: int) -> dict:
        """transformers' tensors -> our single-process names and layouts, fp32; the embedding and output rows
        of the tokenizer's `vocab_size` ids, padded with zeros to `padded_vocab` (rows no token uses)."""
        s = Shapes(m.num_heads, m.num_query_groups or m.num_heads, vocab_size, padded_vocab, m.seq_length)
        out = {}
        for rule in self.rules(m):
            missing = [name for name in rule.theirs if name not in w]
            if missing:
                raise ConfigError(f"checkpoint.init_from=hf: {missing[0]} is not in the model's weights (a "
                                  f"{self.hf_class} of this config.json has it)")
            out[rule.ours] = decode(rule.codec, [w[name] for name in rule.theirs], s)
        return {k: v.float().contiguous() for k, v in out.items()}

    def common(self, m, *, vocab_size: int, eod: int, dtype: str) -> dict:
        return {"vocab_size": vocab_size, "tie_word_embeddings": bool(m.tie_embeddings), "eos_token_id": eod,
                "bos_token_id": eod, "torch_dtype": TORCH_DTYPE_NAMES[dtype], "use_cache": True}
