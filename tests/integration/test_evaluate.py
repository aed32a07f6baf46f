"""`python -m gorilla_dist.evaluate`: on the run's own validation split it reproduces the val_loss training
logged; on other text it equals a plain PyTorch cross entropy over the same windows; bad data is refused."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, check, launch, trained_model
from omegaconf import OmegaConf

from gorilla_dist.data.loader import bundled_corpus

TRAIN = ["model=debug", "train.max_steps=20", "checkpoint.interval=20", "train.eval_interval=20",
         "train.eval_samples=36"]


def evaluate(run, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gorilla_dist.evaluate", f"run.dir={run}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evaluate") / "run"
    check(launch(run, *TRAIN))
    return run


def test_own_validation_split_reproduces_the_logged_val_loss(run, tmp_path):
    cfg = OmegaConf.load(run / "config.yaml")
    logged = next(r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r.get("val_loss") is not None and r["step"] == 20)
    n = 3 * cfg.train.micro_batch_size
    proc = evaluate(run, f"samples={n}", f"out={tmp_path / 'eval.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["step"] == 20 and result["split"] == "validation" and result["samples"] == n
    assert result["loss"] == pytest.approx(logged, rel=1e-5)
    assert result["tokens"] == n * cfg.model.seq_length
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # one char per token, all ASCII: bits per byte is the loss in bits
    assert result["bytes"] == result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert f"loss {result['loss']:.4f}" in proc.stdout
    again = evaluate(run, f"samples={n}", f"out={tmp_path / 'eval.json'}")
    assert again.returncode == 1 and "already exists; not overwriting it" in again.stderr
    # every validation sample: about 2,600 windows, every one scored in full; a different but close loss
    whole = evaluate(run, f"out={tmp_path / 'whole.json'}")
    assert whole.returncode == 0 and "validation split" in whole.stdout, whole.stderr[-3000:]
    every = json.loads((tmp_path / "whole.json").read_text())
    s = cfg.model.seq_length  # every window full but the split's last
    assert every["samples"] > 2000 and (every["samples"] - 1) * s < every["tokens"] <= every["samples"] * s
    assert every["loss"] != result["loss"] and abs(every["loss"] - logged) < 0.05 * logged
    assert f"loss {every['loss']:.4f}" in whole.stdout


def test_training_eval_equals_evaluate_when_batches_score_different_numbers_of_targets(tmp_path):
    """data.reset_at_eod=true: <eod> inputs are not scored, so each validation batch has its own number of
    targets. The loop's val_loss and `evaluate` both weigh every target the same (summed loss / count);
    a mean of per-batch means would differ here by more than the tolerance (checked below)."""
    run = tmp_path / "run"
    check(launch(run, "model=debug", "train.max_steps=2", "train.eval_interval=2", "train.eval_samples=24",
                 "data.reset_at_eod=true", "checkpoint.interval=2"))
    mbs, seq = (lambda c: (c.train.micro_batch_size, c.model.seq_length))(OmegaConf.load(run / "config.yaml"))
    logged = next(r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r.get("val_loss") is not None)
    totals = []  # (summed loss, targets) of the first 1 and 2 batches
    for k in (1, 2):
        proc = evaluate(run, f"samples={k * mbs}", f"batch_size={mbs}", f"out={tmp_path / f'{k}.json'}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((tmp_path / f"{k}.json").read_text())
        totals.append((result["loss"] * result["tokens"], result["tokens"]))
    per_batch = [(totals[0][0], totals[0][1])] + [(b[0] - a[0], b[1] - a[1]) for a, b in zip(totals, totals[1:])]
    counts = [c for _, c in per_batch]
    assert len(set(counts)) > 1 and max(counts) < mbs * seq  # unequal, and fewer than every position
    assert result["loss"] == pytest.approx(logged, rel=1e-6)
    mean_of_means = sum(s / c for s, c in per_batch) / 2
    assert abs(mean_of_means - logged) > 1e-6 * logged


def test_a_text_file_equals_plain_cross_entropy_over_its_windows(world1, run, tmp_path):
    text = bundled_corpus().read_text()[:2000]  # 2000 chars + <eod>: 62 full windows of 32 and a partial one
    (tmp_path / "doc.txt").write_text(text)
    proc = evaluate(run, f"data={tmp_path / 'doc.txt'}", f"out={tmp_path / 'eval.json'}", "batch_size=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    model, tok, m = trained_model(world1, run)
    ids = torch.as_tensor([*tok.encode(text), tok.eod])
    s, total, count = m.seq_length, 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, s):
            x, y = ids[a:a + s], ids[a + 1:a + s + 1]
            # logits of the padding ids are -inf: the softmax covers the real vocabulary, as training's loss
            logits = model(x[None], torch.arange(len(x))[None], None)[0, :len(y)]
            total += F.cross_entropy(logits.double(), y, reduction="sum").item()
            count += len(y)
    assert result["split"] == "all" and result["tokens"] == count == len(text)
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)


def test_bad_data_is_refused_with_the_reason(run, tmp_path):
    (tmp_path / "cjk.txt").write_text("日本語のテキスト")
    proc = evaluate(run, f"data={tmp_path / 'cjk.txt'}")
    assert proc.returncode == 1 and "are not in this char vocabulary" in proc.stderr
    byte_data = tmp_path / "bytes"
    prep = subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", f"input={bundled_corpus()}",
                           f"output={byte_data}", "tokenizer=byte", "progress=false"], cwd=REPO,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    proc = evaluate(run, f"data={byte_data}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: data={byte_data}: prepared with another tokenizer (byte, 257 ids) than "
                                   "this run's; evaluate raw files instead (data=<file>) to tokenize them with the "
                                   "run's tokenizer")
    proc = evaluate(run, "split=test")
    assert proc.returncode == 1 and "split='test' is not valid; choose validation or all" in proc.stderr
