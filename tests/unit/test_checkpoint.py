"""Which directories count as complete checkpoints."""

import json

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
