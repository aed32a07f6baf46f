"""The model's output step, where heads read the final hidden states (written against megatron-core 0.16.1,
see versions.py).

megatron-core's GPTModel.forward runs the decoder (its last norm included) and hands the final hidden states
to `GPTModel._postprocess`, which makes the language-model logits (or loss) on the stage that has the output
(`post_process`; a pipeline stage without it returns the hidden states). Heads of ours read those same hidden
states there (`add_output_heads`): the pretraining objectives' auxiliary heads beside the logits, and a
classifier's head instead of them, so that a classification model neither computes the (b, s, vocab) logits
it would throw away nor has to claim megatron's `post_process=False`, the flag of a pipeline stage without
the output layer. The one private name used: `_postprocess` (its keyword arguments are passed on untouched).
"""

from __future__ import annotations


def add_output_heads(model, heads, *, replace: bool) -> None:
    """After megatron's decoder, `heads(hidden_states)` ((s, b, h) final hidden states) runs on the stage with
    the output; `replace`: the model returns what it returns (a classifier's scores) instead of megatron's
    output, else megatron's output follows as usual."""
    original = model._postprocess

    def postprocess(hidden_states, **kwargs):
        if not model.post_process:  # a pipeline stage without the output: no head here
            return original(hidden_states=hidden_states, **kwargs)
        out = heads(hidden_states)
        return out if replace else original(hidden_states=hidden_states, **kwargs)

    model._postprocess = postprocess
