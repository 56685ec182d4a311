"""Trainer configuration: precedence, explicit-field tracking, round trip, one-line errors."""
import json

import pytest

from rosa_ds import RosaConfig
from rosa_ds.ds import config as dc
from rosa_ds.errors import field_words
from rosa_ds.recipe.config import (
    COMPONENTS,
    TrainConfig,
    all_flag_fields,
    build_parser,
    load_config_file,
    parse_args,
    save_resolved,
)
from rosa_ds.recipe.data import DataConfig
from rosa_ds.recipe.words import flag_words
from rosa_ds.schedule import ScheduleConfig


def test_defaults_are_the_default_job():
    cfg = parse_args([])
    assert (cfg.model, cfg.data.task, cfg.data.dataset, cfg.method, cfg.rosa.rank, cfg.deepspeed) == \
        ("default", "causal_lm", "bbc-headlines", "rosa", 8, "zero2")
    assert (cfg.data.seq_len, cfg.micro_batch, cfg.grad_accum, cfg.epochs) == (128, 4, 1, 2)
    assert (cfg.data.max_train_samples, cfg.data.max_eval_samples, cfg.lr) == (256, 32, 5e-4)
    assert cfg.explicit == set()
    assert parse_args(["--task", "classification"]).data.dataset == "bbc-topics"
    assert parse_args(["--task", "classification"]).data.max_eval_samples == 200
    assert parse_args(["--method", "full"]).lr == 2e-5
    assert cfg.rosa.seed == cfg.data.seed == cfg.seed == 0 and parse_args(["--seed", "5"]).rosa.seed == 5


def test_components_are_composed_not_redeclared():
    """Each flat option is a field of exactly one config; the components are the library's own
    classes, validated by themselves (one place per option)."""
    names = [f.name for _, f in all_flag_fields()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert [c for _, c in COMPONENTS] == [RosaConfig, ScheduleConfig, DataConfig]
    cfg = parse_args(["--rank", "4", "--resample-every", "7", "--seq-len", "64"])
    assert cfg.rosa == RosaConfig(rank=4, seed=0) and cfg.schedule == ScheduleConfig(7)
    assert isinstance(cfg.data, DataConfig) and cfg.data.seq_len == 64


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_precedence_defaults_file_cli(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    settings = {"rank": 4, "lr": 1e-3, "micro_batch": 2, "target_modules": ["q_proj", "v_proj"]}
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        path.write_text("rank: 4\nlr: 1.0e-3\nmicro-batch: 2\ntarget_modules: [q_proj, v_proj]\n")
    cfg = parse_args(["--config", str(path), "--rank", "16", "--seq-len", "64"])
    assert cfg.rosa.rank == 16                 # CLI beats file
    # file beats default
    assert cfg.lr == 1e-3 and cfg.micro_batch == 2 and cfg.rosa.target_modules == ("q_proj", "v_proj")
    assert cfg.data.seq_len == 64 and cfg.epochs == 2  # CLI only / default only
    assert cfg.explicit == {"rank", "lr", "micro_batch", "target_modules", "seq_len"}
    assert cfg.config == str(path)


def test_cli_value_equal_to_default_is_still_explicit():
    assert parse_args(["--micro-batch", "4", "--precision", "auto"]).explicit == {"micro_batch", "precision"}


def test_run_values_carry_explicitness():
    cfg = parse_args(["--lr", "1e-4", "--warmup", "5", "--max-steps", "40", "--epochs", "3"])
    rv = cfg.run_values(total_steps=40)
    assert rv.explicit == {"lr", "warmup_steps", "total_steps"}
    assert (rv.lr, rv.warmup_steps, rv.total_steps, rv.micro_batch) == (1e-4, 5, 40, 4)
    assert parse_args([]).run_values(64).warmup_steps == 6  # 0.1 of 64 steps, rounded
    assert parse_args(["--epochs", "3"]).run_values(64).explicit == frozenset()  # epochs alone pins nothing


def test_explicit_flag_contradicting_json_is_reported(tmp_path):
    tpl = json.loads((dc.TEMPLATES_DIR / "zero2.json").read_text())
    tpl["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(tpl))
    assert dc.batch_sizes(dc.build_ds_config(path, parse_args([]).run_values(10), 2))[0] == 2
    with pytest.raises(dc.DSConfigError,
                       match="train_micro_batch_size_per_gpu=2 in .*ds.json contradicts `micro_batch` 8") as info:
        dc.build_ds_config(path, parse_args(["--micro-batch", "8"]).run_values(10), 2)
    with field_words(flag_words):  # the command line says the flag
        assert "ds.json contradicts --micro-batch 8; fix: drop --micro-batch" in str(info.value)


def test_saved_config_round_trips(tmp_path):
    argv = ["--rank", "4", "--target-modules", "re:.*attn.*", "--resample-every", "25", "--max-train-samples", "none",
            "--tensorboard", "--resume", "--deepspeed", "zero3", "--local_rank=1", "--lr", "2e-4", "--task",
            "classification", "--label-field", "topic"]
    cfg = parse_args(argv)
    assert cfg.rosa.target_modules == ".*attn.*" and cfg.schedule.resample_every == 25
    assert cfg.data.max_train_samples is None
    assert cfg.resume == "latest" and cfg.tensorboard is True and cfg.local_rank == 1
    path = save_resolved(cfg, tmp_path / "out" / "config.json")
    saved = json.loads(path.read_text())
    assert "local_rank" not in saved and "config" not in saved and "explicit" not in saved
    again = parse_args(["--config", str(path)])
    assert again == cfg
    assert again.rosa.to_dict() == cfg.rosa.to_dict()


def test_save_resolved_records_values_the_json_decided(tmp_path):
    tpl = json.loads((dc.TEMPLATES_DIR / "zero2.json").read_text())
    tpl["optimizer"]["params"]["lr"] = 1e-3
    tpl["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    cfg = parse_args([])
    ds = dc.build_ds_config(tpl, cfg.run_values(10), 2)
    again = parse_args(["--config", str(save_resolved(cfg, tmp_path / "c.json", ds_config=ds))])
    assert again.lr == 1e-3 and again.precision == dc.precision(ds)
    dc.build_ds_config(tpl, again.run_values(10), 2)  # no contradiction on re-run


def test_deepspeed_launcher_flags():
    cfg = parse_args(["--local_rank=0", "--deepspeed", "zero1"])
    assert cfg.deepspeed == "zero1" and "local_rank" not in cfg.explicit
    assert parse_args(["--deepspeed_config", "zero3"]).deepspeed == "zero3"
    with pytest.raises(ValueError, match="--deepspeed zero1 and --deepspeed_config zero3 differ"):
        parse_args(["--deepspeed", "zero1", "--deepspeed_config", "zero3"])


@pytest.mark.parametrize("argv,fragment", [
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--quantize-base", "nf5"], "--quantize-base 'nf5' does not exist; choose one of nf4, int8"),
    (["--method", "lora", "--quantize-base", "int8"], "--quantize-base applies to --method rosa only"),
    (["--seq-len", "4"], "--seq-len must be >= 8, got 4"),
    (["--resample-every", "sometimes"],
     "--resample-every 'sometimes' is not valid; fix: use epoch, never, or a positive"),
    (["--resample-every", "0"], "--resample-every 0 is not valid"),
    (["--label-field", "y"],
     "--label-field applies to --task classification only; fix: drop it or use --task classification"),
    (["--target-modules", "re:("], "--target-modules is not a valid regex"),
    (["--task", "classification", "--prompt-field", "p"], "--prompt-field applies to --task causal_lm only"),
    (["--model", "missing.gguf"], "--model missing.gguf not found; fix: give an existing .gguf file"),
    (["--deepspeed", "zero7"], "DeepSpeed config 'zero7' not found; give a JSON path or one of zero1"),
])
def test_bad_values(argv, fragment):
    """Every problem names the flag, never an internal class."""
    with pytest.raises(ValueError) as info:
        parse_args(argv)
    assert fragment in str(info.value)
    assert "Config." not in str(info.value)


def test_argparse_rejects_bad_choices_and_types():
    with pytest.raises(ValueError, match=r"^argument --method: invalid choice: 'qlora' .*; see --help$"):
        parse_args(["--method", "qlora"])
    with pytest.raises(ValueError, match=r"^argument --rank: invalid int value: 'eight'; see --help$"):
        parse_args(["--rank", "eight"])


def test_bad_config_files(tmp_path):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("rnak: 4\nlearning_rate: 1\nepochs: 1\n")
    with pytest.raises(ValueError, match=r"has unknown settings: learning_rate, rnak \(did you mean rank\?\); fix"):
        load_config_file(unknown)
    typed = tmp_path / "t.json"
    typed.write_text('{"rank": "8"}')
    with pytest.raises(ValueError, match=r"--rank must be an integer, got '8' \(str\)"):
        parse_args(["--config", str(typed)])
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="b.json cannot be parsed"):
        load_config_file(broken)
    with pytest.raises(ValueError, match="--config nowhere.json not found"):
        parse_args(["--config", "nowhere.json"])


def test_every_option_has_help_and_a_flag():
    help_text = build_parser().format_help()
    for owner, f in all_flag_fields():
        assert f.metadata["help"], (owner.__name__, f.name)
        assert f"--{f.name.replace('_', '-')}" in help_text, f.name
    assert "(default: 128)" in help_text  # the default job's sequence length, not DataConfig's library default
    own = {f.name for f in TrainConfig.__dataclass_fields__.values() if "help" in f.metadata}
    assert own.isdisjoint({f.name for _, c in COMPONENTS for f in c.__dataclass_fields__.values()} - {"seed"})


def test_exit_now_flushes_and_keeps_the_exit_code():
    """The CLI's exit skips interpreter teardown (gloo threads abort finished ranks there), so it
    must flush what was printed and logged itself, and return the run's code."""
    import subprocess
    import sys

    code = ("import logging, sys; from rosa_ds.utils.dist import exit_now; logging.basicConfig(stream=sys.stderr); "
            "print('out', end=''); logging.getLogger('x').warning('logged'); exit_now(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "out" and "logged" in proc.stderr


def test_an_error_is_one_line_from_rank_0_and_not_lost_on_another_rank(capsys, monkeypatch):
    """The launcher kills every rank when one exits non-zero: rank 0 prints at once, another rank
    waits the grace period first (so rank 0's line comes first when both fail) and then prints
    with its rank, so an error only it hits is never lost."""
    import time as time_module

    from rosa_ds.recipe import cli

    slept = []
    monkeypatch.setattr(time_module, "sleep", slept.append)
    cli.report(ValueError("--lr must be a positive number"), 0)
    assert capsys.readouterr().err == "rosa_ds: error: --lr must be a positive number\n" and slept == []
    cli.report(ValueError("only here"), 1)
    assert capsys.readouterr().err == "rosa_ds: error (rank 1): only here\n" and slept == [cli.RANK0_GRACE]
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["--lr", "0"]) == 2
    assert capsys.readouterr().err.startswith("rosa_ds: error: --lr must be a positive number")


def test_grad_norm_record_says_whether_clipping_acted():
    from rosa_ds.recipe.trainer import grad_norm_record

    assert grad_norm_record(2.0, {"gradient_clipping": 1.0}) == {"grad_norm": 2.0, "clipped": True}
    assert grad_norm_record(0.5, {"gradient_clipping": 1.0})["clipped"] is False
    assert grad_norm_record(2.0, {"gradient_clipping": 0.0})["clipped"] is False  # 0 turns clipping off
    assert grad_norm_record(None, {})["clipped"] is False
