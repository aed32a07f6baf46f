"""`python -m gorilla_dist.export`: a trained run (single process, or tensor parallel through a consolidated
file) exported to a transformers directory; transformers computes the same logits as our model loaded
from the checkpoint, and its greedy generation prints what ours prints."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, check, generate, launch, trained_model

TRAIN = ["model=debug", "train.max_steps=10", "checkpoint.interval=10"]
PROMPT = "ROMEO:"
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"[:32]
NEW = 24  # prompt + new tokens stay within the debug model's 32 positions (our sampler crops beyond it)
LAYOUTS = {
    "local-gpt_neox": ([], "GPTNeoXForCausalLM"),
    "torchrun-tp2-llama-consolidated": (["launch=torchrun", "launch.nproc_per_node=2", "parallel.tp=2",
                                         "model.normalization=RMSNorm", "model.activation=swiglu",
                                         "model.num_query_groups=2"], "LlamaForCausalLM"),
    # experts split over 2 ranks, consolidated by global index, exported as Mixtral
    "torchrun-ep2-mixtral-consolidated": (["launch=torchrun", "launch.nproc_per_node=2", "parallel.ep=2",
                                           "model.normalization=RMSNorm", "model.activation=swiglu",
                                           "model.moe.num_experts=4", "model.moe.topk=2"], "MixtralForCausalLM"),
}


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gorilla_dist.export", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def hf_greedy(out, prompt: str, new: int) -> tuple[str, str]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return type(model).__name__, tok.decode(gen[0]).replace(tok.eos_token, "\n")  # ours decodes <eod> as "\n"


def logits_of_both(world1, run, out, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(our model from the run's newest checkpoint, transformers from the export): logits for `text`."""
    import transformers

    model, tok, _ = trained_model(world1, run)
    ids = torch.as_tensor(tok.encode(text))[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], None)[..., :tok.vocab_size]
        return ours, hf(input_ids=ids).logits


def losses_of_both(world1, run, out, text: str) -> tuple[float, float]:
    """(our training loss on `text`, transformers' loss on it): the same number, the padding rows of our
    vocabulary being masked out of our softmax."""
    import transformers

    from gorilla_dist.data.loader import pack
    from gorilla_dist.loss import lm_loss

    model, tok, _ = trained_model(world1, run)
    ids = torch.as_tensor(tok.encode(text))[None]
    batch = pack(ids.numpy(), np.array([ids.shape[1]]), np.array([0]), eod=tok.eod, reset_at_eod=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return lm_loss(model, batch).item(), hf(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_model_computes_and_generates_like_ours(world1, tmp_path, layout):
    overrides, cls = LAYOUTS[layout]
    run, out = tmp_path / "run", tmp_path / "hf"
    check(launch(run, *TRAIN, *overrides))
    if "consolidated" in layout:
        proc = subprocess.run([sys.executable, "-m", "gorilla_dist.checkpoint", "consolidate", f"run.dir={run}",
                               f"out={tmp_path / 'model.safetensors'}"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        source = [f"consolidated={tmp_path / 'model.safetensors'}"]
    else:
        source = [f"run.dir={run}"]
    proc = export(*source, f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[export] {out}: " in proc.stdout
    ours = generate(run, f"prompt={PROMPT}", f"max_new_tokens={NEW}", "temperature=0")
    assert ours.returncode == 0, ours.stderr[-3000:]
    name, theirs = hf_greedy(out, PROMPT, NEW)
    assert name == cls
    assert theirs == ours.stdout.rstrip("\n")
    assert len(theirs) == len(PROMPT) + NEW
    ours, theirs = logits_of_both(world1, run, out, TEXT)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.1  # 1000x the tolerance
    ours, theirs = losses_of_both(world1, run, out, TEXT)
    assert ours == pytest.approx(theirs, rel=1e-5)

    # a second export onto the same directory is refused and leaves the first one as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = export(*source, f"out={out}")
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: out={out} already exists; not overwriting it (remove it or choose another out=)"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_errors_name_the_problem(tmp_path):
    usage = export(f"out={tmp_path / 'x'}")
    assert usage.returncode == 1 and "usage: python -m gorilla_dist.export (run.dir=<run>" in usage.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    proc = export(f"consolidated={bad}", f"out={tmp_path / 'x'}")
    assert proc.returncode == 1 and f"error: consolidated={bad}: not a safetensors file" in proc.stderr
    typo = export(f"rundir={tmp_path}", f"out={tmp_path / 'x'}")
    assert typo.returncode == 1 and "'rundir=" in typo.stderr and "valid: run.dir= consolidated= out=" in typo.stderr
    assert not (tmp_path / "x").exists()
