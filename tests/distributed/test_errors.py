"""Bad input under a multi-rank launch: one clear message, non-zero exit, no peer tracebacks."""

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
