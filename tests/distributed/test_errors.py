"""Bad input under a multi-rank launch: one clear message, non-zero exit, no peer tracebacks."""

import pytest
import torch
from helpers import launch


def test_binary_corpus_on_two_ranks_fails_with_one_message(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    proc = launch(tmp_path / "run", "launch=torchrun", "launch.nproc_per_node=2", f"data.path={corpus}")
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert errors == [f"[rank 0] error: {corpus}:1: the document contains NUL bytes (binary data?); "
                      "to skip such documents, prepare with on_decode_error=skip"]
    assert "[rank1]: Traceback" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU fp16 trains; this is the CPU refusal")
def test_fp16_on_a_cpu_is_refused_with_its_reason(tmp_path):
    """The README's claim: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): exit 2, one message."""
    # the launcher refuses it on a machine with no GPU (tests/unit/test_launch_refusals.py); told there is
    # one, it lets the workers start, and they refuse it on the device they find
    proc = launch(tmp_path / "run", "precision=fp16", "train.max_steps=1", "parallel.device=auto",
                  env={"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert ("[rank 0] error: precision.dtype=fp16 is not supported on this device (cpu): DeepSpeed has fp16 "
            "training on GPUs only; use precision=bf16 or precision=fp32") in proc.stdout
    assert "Traceback" not in proc.stdout
