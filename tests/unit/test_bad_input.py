"""Bad input is one line naming the problem and its fix, before any weight loads: the CLI's
``main`` runs in-process with the trainer's heavy setup replaced by a tripwire, so a check that
happens too late (or not at all) fails the test instead of loading weights."""
import json
import os
from pathlib import Path

import pytest

from rosa_ds.recipe import cli
from rosa_ds.recipe import trainer as trainer_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(cli_assets, tmp_path_factory):
    from tests.helpers.assets import save_tiny_model_dir

    d = tmp_path_factory.mktemp("bad_input_assets")
    (d / "llama").symlink_to(cli_assets / "llama")
    (d / "data.jsonl").symlink_to(cli_assets / "data.jsonl")
    template = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    contradicting = {**template, "train_micro_batch_size_per_gpu": 2, "optimizer": {
        **template["optimizer"], "params": {**template["optimizer"]["params"], "lr": 5e-4}}}
    (d / "contradicting.json").write_text(json.dumps(contradicting))
    (d / "batch.json").write_text(json.dumps({**template, "train_batch_size": 10}))
    damaged = d / "damaged"
    save_tiny_model_dir(damaged, "llama")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by an interrupted copy
    (d / "a_file").write_text("not a directory")
    return d


def run_cli(assets, tmp_path, monkeypatch, capsys, extra):
    def tripwire(spec):
        raise AssertionError("the input checks passed: the build (weight loading) was reached")

    monkeypatch.setattr(trainer_module, "build", tripwire)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ROSA_DS_CACHE", str(tmp_path / "cache"))
    subst = {"{A}": str(assets), "{OUT}": str(tmp_path / "out")}
    argv = ["--model", str(assets / "llama"), "--dataset", str(assets / "data.jsonl"), "--seq-len", "48",
            "--micro-batch", "4", "--output-dir", str(tmp_path / "out"), "--rank", "4"]
    argv += [x.replace("{A}", subst["{A}"]).replace("{OUT}", subst["{OUT}"]) for x in extra]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
    (["--dataset", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--target-field", "answer"], "record has no field 'answer'"),
    (["--seq-len", "4096"], "--seq-len 4096 is longer than the model's context"),
    (["--deepspeed", "{A}/contradicting.json", "--lr", "1e-3"], "train_micro_batch_size_per_gpu"),
    (["--deepspeed", "{A}/batch.json"], "train_batch_size"),
    (["--deepspeed", "{A}/contradicting.json"], "contradicts --micro-batch 4; fix: drop --micro-batch"),
    (["--model", "{A}/damaged"], "model file {A}/damaged/model.safetensors is damaged (truncated: "),
    (["--output-dir", "{A}/a_file"], "--output-dir {A}/a_file is a file, not a directory"),
    (["--output-dir", "/proc/rosa_ds_run"], "--output-dir /proc/rosa_ds_run is not writable"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--dist-timeout", "0"], "--dist-timeout must be >= 0.1"),
    (["--nan-policy", "ignore"], "argument --nan-policy: invalid choice: 'ignore' (choose from 'stop', 'skip')"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_input_is_one_clear_line_before_weights_load(assets, tmp_path, monkeypatch, capsys, extra, message):
    code, err = run_cli(assets, tmp_path, monkeypatch, capsys, extra)
    message = message.replace("{A}", str(assets))
    block = "DeepSpeed config" in err[0]  # one line that lists each problem of the JSON below it
    assert code == 2 and (len(err) == 1 or block and all(line.startswith("  - ") for line in err[1:])), err
    assert err[0].startswith("rosa_ds: error: ") and message in "\n".join(err), err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / "out" / ".rosa_ds.lock").exists()  # released on the way out


def test_the_lock_is_taken_over_from_a_dead_holder(assets, tmp_path, monkeypatch, capsys):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".rosa_ds.lock").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": dead.pid, "start": 1, "since": "earlier"}))
    with pytest.raises(AssertionError, match="the build .weight loading. was reached"):
        run_cli(assets, tmp_path, monkeypatch, capsys, [])
    assert not (tmp_path / "out" / ".rosa_ds.lock").exists()


def test_only_the_projects_own_errors_are_one_line(monkeypatch, capsys):
    """A RosaError is one line and its exit code; any other exception (a bug, even a ValueError
    from inside a library) keeps its traceback instead of posing as bad input."""
    from rosa_ds.errors import ConfigError

    monkeypatch.setenv("RANK", "0")
    for raised, expected in ((ConfigError("--lr 0 is not positive; fix: give a positive --lr"), 2),
                             (ValueError("a bug"), None)):
        def run(cfg, stop=None, exc=raised):
            raise exc

        monkeypatch.setattr(trainer_module, "run", run)
        if expected is None:
            with pytest.raises(ValueError, match="a bug"):
                cli.main([])
        else:
            assert cli.main([]) == expected
            assert capsys.readouterr().err.strip().splitlines()[-1] == f"rosa_ds: error: {raised}"
