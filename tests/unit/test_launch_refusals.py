"""What the launcher refuses before it writes into run.dir or starts a process: a typo'd key or option
(one line, the closest valid one named), `+key` for a key the schema lacks, checkpoint.resume=never on a
run with checkpoints, a missing checkpoint.init_from, GPU-only options on a machine without a GPU, a
run.dir that is a file, a finetune.trainable / frozen regex that matches no parameter. A refused launch leaves an existing run byte-for-byte as it was. No worker starts:
the run directories here are written by hand."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO


def launcher(tmp_path, *overrides, env=None):
    return subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def refused(proc, *expected):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not proc.stdout


@pytest.mark.parametrize("override,expected", [
    ("modle=debug", "the config has no key 'modle' (did you mean model?)"),
    ("+modle=debug", "the config has no key 'modle' (did you mean model?)"),  # Hydra's own hint, followed
    ("model.num_layrs=2", "no key 'model.num_layrs' (did you mean model.num_layers?)"),
    ("finetune.lora.rnk=4", "(did you mean finetune.lora.rank?)"),
    ("model=debgu", "model=debgu: no such option in conf/model/; choose one of: 1b, debug, gpt2-124m, small, tiny "
                    "(did you mean model=debug?)"),
    ("+model.num_layers=3", "model.num_layers is already in the config; set it without the '+'"),
    ("train.max_steps=abc", "train.max_steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("~train.max_steps", "keys cannot be deleted"),
    ("data.sources=[{path: a, wieght: 1}]", "Key 'wieght' not in 'SourceConfig'"),
    # the README's objectives example once spanned two lines: the first line alone
    ("train.objectives=[{name: clm, weight: 0.6},", "cannot read the override"),
])
def test_a_typo_is_one_line_naming_the_closest_key_and_nothing_is_written(tmp_path, override, expected):
    refused(launcher(tmp_path, override, "run.dir=run"), expected)
    assert not (tmp_path / "run").exists()


def test_a_sweep_with_a_typo_in_one_value_is_refused(tmp_path):
    refused(launcher(tmp_path, "-m", "model=tiny,smal", "run.dir=run"), "(did you mean model=small?)")
    assert not (tmp_path / "sweeps").exists()


@pytest.fixture
def old_run(tmp_path):
    """A run directory as a finished 2-step run leaves it (the files the launcher and a save write)."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}\n")
    (run / "config.yaml").write_text("run:\n  dir: run\n")
    (run / "overrides.json").write_text(json.dumps(["train.max_steps=2"]) + "\n")
    return run


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overrides,env,expected", [
    (["checkpoint.resume=never"], {}, "checkpoint.resume=never but"),
    (["precision=fp16"], {"CUDA_VISIBLE_DEVICES": ""}, "precision.dtype=fp16 needs a GPU"),
    (["model.attention=flash"], {}, "model.attention=flash needs"),
    (["modle=debug"], {}, "did you mean model?"),
    (["train.max_steps=-1"], {}, "train.max_steps"),
    # a regex over the model's parameter names: checked on the model built on the meta device (in a
    # subprocess: the launcher never imports torch)
    (["model=debug", "finetune.method=freeze", "finetune.trainable=['decoder\\.layers\\.[67]\\.']",
      "checkpoint.init_from=run"], {}, "finetune.trainable: 'decoder\\\\.layers\\\\.[67]\\\\.' matches no parameter"),
])
def test_a_refused_launch_leaves_the_run_as_it_was(tmp_path, old_run, overrides, env, expected):
    before = snapshot(old_run)
    refused(launcher(tmp_path, "run.dir=run", *overrides, env=env), expected)
    assert snapshot(old_run) == before


def test_gpu_only_options_are_refused_where_no_gpu_is_visible(tmp_path):
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    refused(launcher(tmp_path, "run.dir=run", "precision=fp16", env=no_gpu),
            "precision.dtype=fp16 needs a GPU (DeepSpeed has fp16 training on GPUs only) and this machine has no GPU "
            "visible", "use precision=bf16 or precision=fp32")
    # a Slurm job: what it asks for counts, not the login node's devices
    refused(launcher(tmp_path, "run.dir=run", "precision=fp16", "launch=slurm", env=no_gpu),
            "the job asks for slurm.gpus_per_node=0")
    flash = launcher(tmp_path, "run.dir=run", "model.attention=flash", env=no_gpu)
    try:
        import flash_attn  # noqa: F401  (not on the CPU machines)
        refused(flash, "model.attention=flash needs a GPU")
    except ImportError:
        refused(flash, "model.attention=flash needs the flash-attn package")
    assert not (tmp_path / "run").exists()


def test_init_from_must_hold_a_checkpoint_on_the_first_start(tmp_path, old_run):
    refused(launcher(tmp_path, "run.dir=new", "checkpoint.init_from=nope"),
            "checkpoint.init_from=", "nope': no such directory; expected a run directory")
    (tmp_path / "empty").mkdir()
    refused(launcher(tmp_path, "run.dir=new", "checkpoint.init_from=empty"), "holds no complete checkpoint")
    assert not (tmp_path / "new").exists()
    # a restart resumes its own checkpoints: the source may be gone by then
    ok = launcher(tmp_path, "run.dir=run", "checkpoint.init_from=nope", "--cfg", "job")
    assert ok.returncode == 0, ok.stderr


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("keep me\n")
    refused(launcher(tmp_path, "run.dir=afile"), "run.dir=", "afile' is a file; a run directory")
    assert (tmp_path / "afile").read_text() == "keep me\n"


def tool(tmp_path, module, *args):
    return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def tool_refused(proc, expected):
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and lines == [f"error: {expected}"], proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported  # refused before the ~1 s import


@pytest.mark.parametrize("args,expected", [
    (["run.dir=nope"], "run.dir=nope: no such directory"),
    (["run.dir=."], "run.dir=. is not a run directory (no config.yaml; runs are started with python -m launcher "
                    "run.dir=.)"),
    (["run.dir=.", "checkpoint=gone"], "checkpoint=gone: no such directory; expected one of a run's checkpoints "
                                       "(run.dir/checkpoints/step_XXXXXXXX), or checkpoint=latest (the default)"),
    (["run.dir=.", "temperature=-1"], "temperature=-1.0 must be >= 0 (0: greedy)"),
    (["run.dir=.", "top_k=-5"], "top_k=-5 must be >= 0 (0 or none: no top-k filter)"),
    ([], "run.dir=<run directory> is required"),
])
def test_generate_checks_its_arguments_before_importing_torch(tmp_path, args, expected):
    tool_refused(tool(tmp_path, "gorilla_dist.generate", *args), expected)


def test_evaluate_and_export_name_a_missing_run(tmp_path):
    for module in ("gorilla_dist.evaluate", "gorilla_dist.export"):
        proc = tool(tmp_path, module, "run.dir=runs/nope", "out=x")
        assert proc.returncode == 2 and "error: run.dir=runs/nope: no such directory" in proc.stderr, proc.stderr[-2000:]


def test_ranks_per_node_need_a_gpu_each(tmp_path):
    """The launcher counts the GPUs the workers would see (CUDA_VISIBLE_DEVICES here) or the job asks for."""
    refused(launcher(tmp_path, "run.dir=run", "launch=torchrun", "launch.nproc_per_node=2",
                     env={"CUDA_VISIBLE_DEVICES": "0"}),
            "launch.nproc_per_node=2 ranks per node, but this machine has 1 GPU visible: each rank needs its own GPU; "
            "set launch.nproc_per_node<=1, or parallel.device=cpu")
    refused(launcher(tmp_path, "run.dir=run", "launch=slurm", "launch.nproc_per_node=4", "slurm.gpus_per_node=2"),
            "launch.nproc_per_node=4 ranks per node, but slurm.gpus_per_node=2")
    refused(launcher(tmp_path, "run.dir=run", "launch=slurm", "launch.nproc_per_node=2", "slurm.gpus_per_node=8"),
            "launch.nproc_per_node=2 ranks per node, but slurm.gpus_per_node=8: 6 allocated GPUs per node would stay "
            "idle; set launch.nproc_per_node=8 (one rank per GPU), or slurm.idle_gpus=true")
    asked = launcher(tmp_path, "run.dir=run", "launch=slurm", "launch.nproc_per_node=2", "slurm.gpus_per_node=8",
                     "slurm.idle_gpus=true", "slurm.submit=false")
    assert asked.returncode == 0 and (tmp_path / "run" / "train.sbatch").is_file(), asked.stderr
    shutil.rmtree(tmp_path / "run")
    refused(launcher(tmp_path, "run.dir=run", "parallel.device=cuda", env={"CUDA_VISIBLE_DEVICES": ""}),
            "parallel.device=cuda but this machine has no GPU visible")
    refused(launcher(tmp_path, "run.dir=run", "parallel.device=gpu"), "parallel.device='gpu' is not valid; choose one "
                                                                       "of: auto, cpu, cuda")
    refused(launcher(tmp_path, "run.dir=run", "parallel.device=cpu", "precision=fp16", env={"CUDA_VISIBLE_DEVICES": "0"}),
            "precision.dtype=fp16 needs a GPU (DeepSpeed has fp16 training on GPUs only) and parallel.device=cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting,local_rank,cuda,gpus,expected", [
    ("auto", 0, False, 0, "cpu"), ("auto", 1, True, 2, "cuda:1"), ("cpu", 0, True, 8, "cpu"),
    ("cuda", 0, False, 0, "torch finds no usable GPU here"),
    ("auto", 1, True, 1, "LOCAL_RANK=1, but this node has 1 GPU visible: each rank needs its own GPU, so at most 1 "
                         "ranks per node"),
])
def test_each_rank_picks_its_device(setting, local_rank, cuda, gpus, expected):
    from gorilla_dist.errors import ConfigError
    from gorilla_dist.parallel import pick_device

    if expected in ("cpu", "cuda:1"):
        assert str(pick_device(setting, local_rank, cuda, gpus)) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            pick_device(setting, local_rank, cuda, gpus)
