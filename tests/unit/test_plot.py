"""Pictures and summaries of runs from their files: the panels a run's metrics call for, one figure for
several runs with a legend naming each and what differs, one clear error for a missing, empty,
malformed or single-row metrics file; the summary's numbers recomputed by hand."""

from __future__ import annotations

import json
import math
import re

import pytest

from gorilla_dist.errors import DataError
from gorilla_dist.plot import load_run, main, plot, smooth
from gorilla_dist.summary import summarize


def write_run(path, *, lr=1e-3, steps=20, objectives=False, moe=False):
    path.mkdir(parents=True)
    rows = [{"step": 0, "memory": "start", "ranks": [{"params": 10}]},
            {"step": 1, "memory": "first_step", "ranks": [{"params": 10, "grads": 10, "optimizer": 20},
                                                          {"params": 10, "grads": 10, "optimizer": 30}]}]
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 4.0 / s ** 0.3, "lr": lr, "grad_norm": 1.0 / s, "tokens_per_s": 1000.0 + s}
        if objectives:
            row.update(loss_clm=row["loss"], loss_denoise_R=row["loss"] + 0.5, units_clm=10)
        if moe:
            row.update(moe_load_max=1.5, moe_load_min=0.5)
        rows.append(row)
        if s % 5 == 0:
            rows.append({"step": s, "val_loss": 4.1 / s ** 0.25})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.yaml").write_text(f"run:\n  dir: {path}\noptim:\n  lr: {lr}\ntrain:\n  global_batch_size: 4\n"
                                      "model:\n  seq_length: 8\n")
    return path


def test_one_run_gets_a_panel_per_quantity_it_logged(tmp_path):
    from PIL import Image

    result = plot([load_run(write_run(tmp_path / "a"))], tmp_path / "a.png")
    assert result["panels"] == ["training loss", "validation loss", "learning rate", "gradient norm", "tokens/s"]
    with Image.open(tmp_path / "a.png") as im:
        assert im.size[0] == 960 and im.size[1] == round(2.6 * 80 * 5)  # two columns (step, tokens), 5 rows
    more = plot([load_run(write_run(tmp_path / "b", objectives=True, moe=True))], tmp_path / "b.png")
    assert more["panels"][-2:] == ["loss per objective", "MoE load (max, min; 1 = uniform)"]


def test_several_runs_share_one_figure_labelled_by_what_differs(tmp_path, capsys):
    a, b = write_run(tmp_path / "lr-small", lr=1e-3), write_run(tmp_path / "lr-big", lr=3e-3)
    assert main([f"run.dir={a}", f"run.dir={b}", f"out={tmp_path / 'both.png'}"]) == 0
    out = capsys.readouterr().out
    assert "lr-small (optim.lr=0.001), lr-big (optim.lr=0.003)" in out and (tmp_path / "both.png").stat().st_size > 10_000


@pytest.mark.parametrize(("content", "message"), [
    (None, "metrics.jsonl: not there"),
    ("", "0 training step(s) logged"),
    ('{"step": 1, "loss": 2.0}\n', "1 training step(s) logged; a curve needs two or more"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n', "metrics.jsonl:2: not a JSON row"),
    ('{"loss": 2.0}\n', "metrics.jsonl:1: a row without an integer 'step'"),
])
def test_bad_metrics_give_one_clear_error(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_run(run)
    assert main([f"run.dir={run}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.split(":")[0] in err and "Traceback" not in err


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_the_summary_is_recomputed_from_metrics():
    rows = [json.loads(x) for x in (  # two sessions: a resumed run logs on after step 3
        '{"step": 1, "memory": "first_step", "ranks": [{"params": 4, "grads": 4}]}',
        '{"step": 1, "loss": 3.0, "tokens_per_s": 100.0, "mfu": 0.1}', '{"step": 2, "loss": 2.5, "tokens_per_s": 300.0, "mfu": 0.3}',
        '{"step": 2, "val_loss": 2.4}', '{"step": 3, "loss": 2.0, "tokens_per_s": 200.0, "mfu": 0.2}',
        '{"step": 4, "val_loss": 2.6}', '{"step": 4, "loss": 2.2, "tokens_per_s": 400.0, "mfu": 0.4}')]
    got = summarize(rows, tokens_per_step=32, max_steps=10)
    assert got["steps"] == 4 and not got["finished"] and got["tokens_seen"] == 128
    assert got["final_loss"] == 2.2 and got["final_val_loss"] == 2.6
    assert (got["best_val_loss"], got["best_val_step"]) == (2.4, 2)
    assert got["mean_tokens_per_s"] == 250.0 and math.isclose(got["mean_mfu"], 0.25)
    assert got["peak_memory"] == [{"params": 4, "grads": 4, "total": 8}]
