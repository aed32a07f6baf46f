"""The prepare CLI → the launcher with blended data.sources → resume, end to end."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, check, launch, metrics

COMMON = ["optim.warmup_steps=2", "optim.decay_steps=20", "train.eval_interval=10", "checkpoint.keep=0", "checkpoint.interval=0",
          "model.seq_length=32"]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gorilla_dist.data.prepare", "progress=false", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpora")
    text = (REPO / "gorilla_dist" / "data" / "tinyshakespeare.txt").read_text()
    speeches = text.split("\n\n")
    half = len(speeches) // 2
    with open(root / "a.jsonl", "w") as f:
        for s in speeches[:half]:
            f.write(json.dumps({"text": s + "\n"}) + "\n")
    pq.write_table(pa.table({"content": [s + "\n" for s in speeches[half:]]}), root / "b.parquet")
    first = prepare(f"input={root / 'a.jsonl'}", f"output={root / 'web'}", "tokenizer=bpe:300")
    assert first.returncode == 0, first.stderr
    second = prepare(f"input={root / 'b.parquet'}", f"output={root / 'books'}", "field=content",
                     f"tokenizer={root / 'web' / 'tokenizer.json'}")
    assert second.returncode == 0, second.stderr
    return f"data.sources=[{{path: {root / 'web'}, weight: 0.7}}, {{path: {root / 'books'}, weight: 0.3}}]"


def test_blended_sources_train_and_resume_bitwise(tmp_path, sources):
    straight, split = tmp_path / "straight", tmp_path / "split"
    check(launch(straight, sources, *COMMON, "train.max_steps=20"))
    tok = json.loads((straight / "tokenizer.json").read_text())
    assert tok["kind"] == "hf"  # the sources' BPE tokenizer became the run's (and the model's vocabulary)
    check(launch(split, sources, *COMMON, "train.max_steps=10"))
    resumed = check(launch(split, sources, *COMMON, "train.max_steps=20"))
    assert "resumed from" in resumed
    a, b = metrics(straight), metrics(split)
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]  # bitwise, including the data position
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert a[-1]["val_loss"] < a[0]["loss"]  # it learned something


def test_changed_sources_on_resume_are_refused(tmp_path, sources):
    run = tmp_path / "run"
    check(launch(run, sources, *COMMON, "train.max_steps=5"))
    reweighted = sources.replace("weight: 0.7", "weight: 0.5")
    proc = launch(run, reweighted, *COMMON, "train.max_steps=10")
    assert proc.returncode == 1
    assert "error: the checkpoint's data order was made from other data.sources" in proc.stdout


def test_a_corrupted_source_stops_the_run_before_training(tmp_path, sources):
    import re
    import shutil

    books = re.search(r"path: ([^,]+books)", sources).group(1)
    broken = tmp_path / "books"
    shutil.copytree(books, broken)
    shard = broken / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    proc = launch(tmp_path / "run", sources.replace(books, str(broken)), *COMMON, "train.max_steps=5")
    assert proc.returncode == 1
    assert f"error: {shard}: sha256 does not match meta.json" in proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_generate_evaluate_and_export_need_only_the_run_after_its_data_is_deleted(tmp_path, sources):
    """A run's checkpoints, tokenizer and config are all the tools need: with its data.sources deleted,
    generate and export work, evaluate reads other data, and only what needs the data says it is gone."""
    import re
    import shutil

    moved = sources
    for path in re.findall(r"path: ([^,]+)", sources):
        copy = tmp_path / "sources" / path.rsplit("/", 1)[-1]
        shutil.copytree(path, copy)
        moved = moved.replace(path, str(copy))
    run = tmp_path / "run"
    check(launch(run, moved, *COMMON, "train.max_steps=2"))
    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question.\n" * 20)

    def tool(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)

    def outputs(tag: str) -> dict:
        """What generate, export and evaluate (on other data) give: text, the exported files, the numbers."""
        gen = tool("gorilla_dist.generate", f"run.dir={run}", "max_new_tokens=5", "temperature=0")
        assert gen.returncode == 0, gen.stderr[-2000:]
        exported = tool("gorilla_dist.export", f"run.dir={run}", f"out={tmp_path / ('hf_' + tag)}")
        assert exported.returncode == 0, exported.stderr[-2000:]
        other = tool("gorilla_dist.evaluate", f"run.dir={run}", f"data={tmp_path / 'doc.txt'}",
                     f"out={tmp_path / ('eval_' + tag + '.json')}")
        assert other.returncode == 0, other.stderr[-2000:]
        files = {f.name: f.read_bytes() for f in sorted((tmp_path / ("hf_" + tag)).iterdir())}
        return {"text": gen.stdout, "files": files,
                "eval": json.loads((tmp_path / ("eval_" + tag + ".json")).read_text())}

    before = outputs("before")
    # while the data is there: the blend's own validation split, one line per source and a total that is
    # their token-weighted mean
    blend = tool("gorilla_dist.evaluate", f"run.dir={run}", f"out={tmp_path / 'blend.json'}")
    assert blend.returncode == 0, blend.stderr[-2000:]
    result = json.loads((tmp_path / "blend.json").read_text())
    parts = result["sources"]
    assert len(parts) == 2 and all(p["tokens"] > 0 for p in parts.values())
    assert result["tokens"] == sum(p["tokens"] for p in parts.values())
    assert result["loss"] == pytest.approx(sum(p["loss"] * p["tokens"] for p in parts.values()) / result["tokens"])
    for name, p in [*parts.items(), ("total", result)]:
        assert f"  {name}: loss {p['loss']:.4f}" in blend.stdout, blend.stdout
    shutil.rmtree(tmp_path / "sources")
    after = outputs("after")
    assert after["text"] == before["text"] and len(before["text"]) >= 5
    assert after["files"] == before["files"] and "model.safetensors" in before["files"]
    assert after["eval"] == before["eval"] and before["eval"]["tokens"] > 0
    own = tool("gorilla_dist.evaluate", f"run.dir={run}")
    assert own.returncode == 1
    assert "the run's data is not there any more (moved or deleted)" in own.stderr and "data=<" in own.stderr
    again = launch(run, moved, *COMMON, "train.max_steps=4")  # training needs its data: refused up front
    assert again.returncode == 2 and "no such directory" in again.stdout
