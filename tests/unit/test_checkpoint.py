"""Which directories count as complete checkpoints."""

import json

import pytest
import torch

from gorilla_dist.checkpoint import complete_checkpoints, verify


def fake_ckpt(root, step, *, manifest=True, truncate=False):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * 100)
    (d / "trainer.json").write_bytes(b"y" * 10)
    if manifest:
        (d / "manifest.json").write_text(json.dumps({"step": step, "files": {"model.safetensors": 100,
                                                                            "trainer.json": 10}}))
    if truncate:
        (d / "model.safetensors").write_bytes(b"x" * 40)
    return d


def test_only_verified_checkpoints_count(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    good10 = fake_ckpt(root, 10)
    good20 = fake_ckpt(root, 20)
    fake_ckpt(root, 30, manifest=False)  # save interrupted before the manifest
    fake_ckpt(root, 40, truncate=True)  # a file cut short after the manifest
    (root / ".tmp-step_00000050").mkdir()  # interrupted save
    (root / "notes").mkdir()
    assert complete_checkpoints(root, report=True) == [good10, good20]
    err = capsys.readouterr().err
    assert "step_00000030: no manifest.json" in err
    assert "step_00000040: model.safetensors has 40 bytes, the manifest says 100" in err
    assert ".tmp-step_00000050: an interrupted save" in err
    assert all(p.exists() for p in root.iterdir())  # reported and skipped, never deleted
    assert verify(good20) is None


def test_a_corrupted_checkpoint_is_caught_by_its_checksums_and_skipped(tmp_path, capsys):
    from gorilla_dist.checkpoint import newest_usable
    from gorilla_dist.files import sha256_file

    root = tmp_path / "checkpoints"
    for step in (10, 20):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        files = {"model.safetensors": {"size": 1024, "sha256": sha256_file(d / "model.safetensors")}}
        (d / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    newest = root / "step_00000020"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[500] ^= 0x01  # one flipped bit, same size: only the checksum can tell
    (newest / "model.safetensors").write_bytes(bytes(data))
    assert verify(newest) is None  # sizes alone pass
    assert verify(newest, checksums=True) == "model.safetensors: sha256 does not match the manifest (the file is corrupted)"
    assert newest_usable(root, report=True) == root / "step_00000010"
    assert "skipping corrupted checkpoint" in capsys.readouterr().err and newest.exists()  # never deleted


def test_streamed_safetensors_file_reads_back_with_safetensors(tmp_path):
    """write_streaming's file is an ordinary safetensors file; its manifest entry is the file's."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gorilla_dist.checkpoint.tensorfile import write_tensors
    from gorilla_dist.files import sha256_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "empty": torch.zeros(0, 4), "ids": torch.arange(5, dtype=torch.int64), "odd": torch.ones(3, dtype=torch.int8)}
    entry = write_tensors(tmp_path / "t.safetensors", tensors, {"step": "3"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                                 for k, v in tensors.items())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata() == {"step": "3"}
    assert entry == {"size": (tmp_path / "t.safetensors").stat().st_size, "sha256": sha256_file(tmp_path / "t.safetensors")}


def _pieces(full: torch.Tensor, tp: int, dim: int, gated: bool, dp: int) -> list[dict]:
    """Every (TP, DP) rank's Pieces of `full`: TP shards (tp_split), each cut into dp ZeRO-3-like ranges."""
    from gorilla_dist.engine.state import Piece, tp_split

    ranks = []
    for t in range(tp):
        local = tp_split(full, t, tp, dim, gated) if tp > 1 else full
        flat = local.reshape(-1)
        n = -(-flat.numel() // dp)
        for d in range(dp):
            part = flat[d * n:(d + 1) * n]
            ranks.append({"w": Piece(tuple(full.shape), (t, tp, dim, gated) if tp > 1 else None, tuple(local.shape),
                                     d * n, part.clone())} if part.numel() else {})
    return ranks


@pytest.mark.parametrize("tp,dim,gated,dp", [(1, 0, False, 1), (1, 0, False, 3), (2, 0, False, 2), (2, 1, False, 3),
                                            (4, 0, True, 2)])
def test_shards_of_any_layout_join_into_the_whole_tensor(tmp_path, tp, dim, gated, dp):
    
    from gorilla_dist.checkpoint.shards import ShardedTensors, shard_name, write_shard

    full = torch.randn(16, 10)
    (tmp_path / "shards").mkdir()
    for rank, pieces in enumerate(_pieces(full, tp, dim, gated, dp)):
        write_shard(tmp_path / shard_name("model", rank), pieces, step=1)
    handle = ShardedTensors(tmp_path, "model")
    assert handle.keys() == ["w"] and handle.get_slice("w").get_shape() == [16, 10]
    assert torch.equal(handle.get_tensor("w"), full)


def test_a_missing_shard_is_named_not_joined_wrongly(tmp_path):
    
    from gorilla_dist.checkpoint.shards import ShardedTensors, shard_name, write_shard
    from gorilla_dist.errors import CheckpointError

    (tmp_path / "shards").mkdir()
    for rank, pieces in enumerate(_pieces(torch.randn(16, 10), 2, 0, False, 3)):
        if rank != 1:  # TP rank 0's middle range
            write_shard(tmp_path / shard_name("model", rank), pieces, step=1)
    with pytest.raises(CheckpointError, match=r"w \(TP rank 0\) has no part for elements 27\.\.54"):
        ShardedTensors(tmp_path, "model").get_tensor("w")
