"""Config composition and validation: bad input stops before any worker starts, with one message that
names the key, the value and what is valid."""

import pytest
from helpers import composed, launch

from gorilla_dist.config import check_inputs, validate
from gorilla_dist.errors import ConfigError


def test_default_config_is_valid_and_derives_micro_batch():
    cfg = composed()
    validate(cfg)
    assert cfg.model.name == "tiny" and cfg.train.micro_batch_size == 12
    cfg = composed("launch=torchrun", "launch.nproc_per_node=2", "train.global_batch_size=12")
    validate(cfg)
    assert cfg.train.micro_batch_size == 6


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "model.num_heads(4) is not divisible by parallel.tp(3); valid tp values: [1, 2, 4]"),
    (["launch=torchrun", "launch.nproc_per_node=2", "train.micro_batch_size=4"],
     "train.global_batch_size(12) is not divisible by train.micro_batch_size(4) * data_parallel(2) = 8"),
    (["precision.dtype=fp8"], "precision.dtype='fp8' is not valid; choose one of: fp32, bf16, fp16"),
    (["parallel.zero_stage=4"], "parallel.zero_stage=4 is not valid; choose one of: 0, 1, 2, 3"),
    (["launch.nproc_per_node=2"], "launch.backend=local starts one process but launch.nproc_per_node=2"),
    (["launch=torchrun", "launch.nproc_per_node=3", "parallel.tp=2"],
     "world size 3 (launch.nproc_per_node) is not divisible by parallel.tp(2)"),
    (["data.path=/nonexistent/corpus.txt"], "data.path='/nonexistent/corpus.txt': no such file"),
    (["optim.min_lr=0.1"], "optim.min_lr(0.1) must not exceed optim.lr(0.001)"),
    (["parallel.activation_checkpointing=some"],
     "parallel.activation_checkpointing='some' is not valid; choose one of: none, selective, full"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true splits the sequence over the "
                                          "tensor-parallel ranks, but parallel.tp=1"),
    (["launch=torchrun", "launch.nproc_per_node=4", "parallel.tp=4", "parallel.sequence_parallel=true",
      "model.seq_length=66"], "model.seq_length(66) is not divisible by parallel.tp(4), which "
                              "parallel.sequence_parallel=true needs"),
])
def test_invalid_values_name_key_value_and_choices(overrides, message):
    with pytest.raises(ConfigError) as err:
        cfg = composed(*overrides)
        validate(cfg)
        check_inputs(cfg)
    assert message in str(err.value)


def test_consistency_checks_read_no_file_and_input_checks_do():
    """validate() runs wherever a run's config is read again (generate, evaluate, export): it must not
    fail because the run's inputs were moved. check_inputs() is the launcher's and the worker's."""
    cfg = composed("data.path=/nonexistent/corpus.txt", "data.tokenizer=/nonexistent/tokenizer.json",
                   "checkpoint.resume=/nonexistent/step_00000010")
    validate(cfg)
    with pytest.raises(ConfigError, match="data.path='/nonexistent/corpus.txt': no such file"):
        check_inputs(cfg)
    cfg.data.path = None
    with pytest.raises(ConfigError, match="data.tokenizer='/nonexistent/tokenizer.json': expected char"):
        check_inputs(cfg)
    cfg.data.tokenizer = "char"
    with pytest.raises(ConfigError, match="checkpoint.resume='/nonexistent/step_00000010': expected auto"):
        check_inputs(cfg)


def test_launcher_rejects_bad_config_before_starting_workers(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, "model.num_heads=3")
    assert proc.returncode == 2
    assert proc.stdout.strip() == "config error: model.hidden_size(64) is not divisible by model.num_heads(3)"
    assert not run.exists()  # nothing written, no process started


def test_launcher_typo_key_and_unknown_group_option(tmp_path):
    proc = launch(tmp_path / "r", "train.max_stepz=3")
    assert proc.returncode == 2 and "no key 'train.max_stepz' (did you mean train.max_steps?)" in proc.stdout
    proc = launch(tmp_path / "r", "precision=fp8")
    assert proc.returncode == 2
    assert "precision=fp8: no such option in conf/precision/; choose one of: bf16, fp16, fp32" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_cfg_job_prints_resolved_config(tmp_path):
    proc = launch(tmp_path / "r", "model=small", "parallel.zero_stage=3", "precision=bf16", "--cfg", "job",
                  quick=False)
    assert proc.returncode == 0
    assert "name: small" in proc.stdout and "zero_stage: 3" in proc.stdout and "dtype: bf16" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_configs_of_older_runs_with_a_recorded_vocab_size_still_load():
    """Runs before the vocabulary came from the tokenizer wrote model.vocab_size into their checkpoints'
    config.yaml; generate, evaluate, export and resume still read them."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import parse_run_config

    old = OmegaConf.to_yaml(composed("model=debug")).replace("  name: debug\n", "  name: debug\n  vocab_size: 66\n")
    assert "vocab_size: 66" in old
    assert not hasattr(parse_run_config(old, "old/config.yaml").model, "vocab_size")
    with pytest.raises(ConfigError, match=r"old/config.yaml: Key 'vocab_sise' not in 'ModelConfig'"):
        parse_run_config(old.replace("vocab_size", "vocab_sise"), "old/config.yaml")


def test_configs_of_older_runs_with_every_objective_field_still_load():
    """Runs before each objective had its own options wrote all of them into every train.objectives entry;
    they load with each objective's own options kept (a denoise entry keeps its mode), the others dropped."""
    from omegaconf import OmegaConf

    from gorilla_dist.config import parse_run_config

    flat = ("    target: source\n    labels: []\n    temperature: 0.1\n    projection: 64\n    mode: {mode}\n"
            "    mean_span: 3.0\n    rate: 0.15\n    mask: 1.0\n    replace: 0.0\n    delete: 0.0\n")
    new = OmegaConf.to_yaml(composed("model=debug", "data.path=/tmp/any.txt", "data.tokenizer=byte",
                                     "train.objectives=[{name: clm, weight: 0.5}, {name: denoise, mode: X}]"))
    start = new.index("  objectives:\n")  # (the new entries end with denoise's last option, delete)
    old = new[:start] + ("  objectives:\n  - name: clm\n    weight: 0.5\n" + flat.format(mode="R")
                         + "  - name: denoise\n    weight: 1.0\n" + flat.format(mode="X"))
    old += new[new.index("\n", new.index("delete:", start)) + 1:]
    cfg = parse_run_config(old, "old/config.yaml")
    clm, denoise = cfg.train.objectives
    assert (clm.name, clm.weight, denoise.mode, denoise.mean_span) == ("clm", 0.5, "X", 3.0)
    assert not hasattr(clm, "mode") and not hasattr(denoise, "temperature")


def test_a_run_config_is_read_back_as_typed_sections(tmp_path):
    """Workers and tools get the schema's dataclasses, section by section, not OmegaConf nodes."""
    from gorilla_dist.config import Config, ModelConfig, SourceConfig, load_run_config, save_run_config

    cfg = composed("model=debug", f"run.dir={tmp_path}", "data.sources=[{path: /somewhere, weight: 2}]")
    save_run_config(cfg, tmp_path)
    typed = load_run_config(tmp_path)
    assert type(typed) is Config and type(typed.model) is ModelConfig and typed.model.num_layers == 2
    assert typed.data.sources == [SourceConfig(path="/somewhere", weight=2.0)]  # no file is read: see check_inputs


TWO_STAGES = ["launch=torchrun", "launch.nproc_per_node=2", "parallel.pp=2"]


@pytest.mark.parametrize("overrides, message", [
    (["launch=torchrun", "launch.nproc_per_node=3", "parallel.pp=2"],
     "world size 3 (launch.nproc_per_node) is not divisible by parallel.tp(1) * parallel.pp(2) = 2"),
    (["launch=torchrun", "launch.nproc_per_node=8", "parallel.pp=8", "model=debug"],
     "parallel.pp=8 pipeline stages for model.num_layers=2: each stage needs at least one decoder layer; "
     "set parallel.pp <= 2"),
    ([*TWO_STAGES, "model=debug", "parallel.pp_layers=[1,3]"],
     "parallel.pp_layers=[1, 3] sums to 4 layers, but model.num_layers=2"),
    ([*TWO_STAGES, "model=debug", "parallel.pp_layers=[2]"],
     "parallel.pp_layers=[2] has 1 entries; parallel.pp=2 needs one per pipeline stage"),
    (["model=debug", "parallel.pp_layers=[1,1]"], "parallel.pp_layers=[1, 1] splits the layers over 2 stages, but "
                                                   "parallel.pp=1; set parallel.pp=2"),
    ([*TWO_STAGES, "parallel.zero_stage=2"], "parallel.zero_stage=2 with parallel.pp=2: ZeRO-2/3 partition the "
                                             "gradients"),
    ([*TWO_STAGES, "parallel.zero_stage=3"], "use parallel.zero_stage=0 or 1"),
    ([*TWO_STAGES, "model.num_layers=4", "model.sharing.unique_layers=2"],
     "model.sharing.unique_layers=2 with parallel.pp=2: layers sharing weights across pipeline stages"),
    ([*TWO_STAGES, "parallel.pp=0"], "parallel.pp=0 must be > 0"),
    # the interleaved schedule
    ([*TWO_STAGES, "parallel.pp_schedule=interleaved"],
     "parallel.pp_schedule=interleaved with parallel.pp=2 and parallel.pp_virtual=1: the interleaved schedule runs "
     "pp_virtual >= 2 model chunks"),
    ([*TWO_STAGES, "parallel.pp_virtual=2"], "parallel.pp_virtual=2 with parallel.pp_schedule=1f1b"),
    ([*TWO_STAGES, "parallel.pp_schedule=zigzag"], "parallel.pp_schedule='zigzag' is not valid; choose one of: "
                                                   "1f1b, interleaved"),
    ([*TWO_STAGES, "model=debug", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2"],
     "parallel.pp=2 x parallel.pp_virtual=2 = 4 virtual pipeline stages for model.num_layers=2: each stage needs at "
     "least one decoder layer; set parallel.pp * parallel.pp_virtual <= 2"),
    ([*TWO_STAGES, "model.num_layers=4", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2",
      "parallel.pp_layers=[2,2]"],
     "parallel.pp_layers=[2, 2] has 2 entries; parallel.pp=2 x parallel.pp_virtual=2 = 4 needs one per virtual "
     "pipeline stage"),
    ([*TWO_STAGES, "model.num_layers=4", "parallel.pp_schedule=interleaved", "parallel.pp_virtual=2",
      "train.global_batch_size=12", "train.micro_batch_size=4"],
     "parallel.pp_schedule=interleaved runs the micro-batches in groups of parallel.pp=2, but a step has 3 per rank "
     "(train.global_batch_size=12 / (train.micro_batch_size=4 x data-parallel 1)); make it a multiple of 2"),
])
def test_impossible_or_unbuilt_pipeline_layouts_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    assert message in str(err.value)
