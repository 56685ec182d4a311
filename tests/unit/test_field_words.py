"""Lower layers name config fields in their messages; each front end says them in its own words:
the recipe's command line as flags, the Trainer path as ``TrainingArguments`` names. And no layer
below the recipe writes one of the recipe's flags into a string (docstrings and comments aside)."""
import ast
import re
from pathlib import Path

import pytest

from rosa_ds.ds.config import DSConfigError, RunValues, build_ds_config
from rosa_ds.errors import ConfigError, config_field, field_words, render_fields
from rosa_ds.hf.words import trainer_words
from rosa_ds.recipe.config import all_flag_fields
from rosa_ds.recipe.words import flag_words
from rosa_ds.utils.options import flag_name

PKG = Path(__file__).resolve().parents[2] / "rosa_ds"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


def batch_contradiction() -> DSConfigError:
    """train_batch_size 32 against micro-batch 4 × accumulation 2 × 2 ranks = 16."""
    template = {"train_batch_size": 32, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    run = RunValues(micro_batch=4, grad_accum=2, lr=1e-3, total_steps=10, precision="fp32",
                    explicit={"grad_accum"})
    with pytest.raises(DSConfigError) as info:
        build_ds_config(template, run, world_size=2)
    return info.value


def test_a_lower_layer_error_says_each_front_ends_words():
    err = batch_contradiction()
    assert "contradicts `micro_batch` 4 × `grad_accum` 2 × world size 2 = 16" in str(err)  # readable as is
    with field_words(flag_words):
        assert "contradicts --micro-batch 4 × --grad-accum 2 × world size 2 = 16" in str(err)
    with field_words(trainer_words):
        assert ("contradicts per_device_train_batch_size 4 × gradient_accumulation_steps 2 × world size 2 = 16"
                in str(err))
    assert "`micro_batch`" in str(err)  # the words hold only inside the block


def test_the_trainer_path_sets_its_words_in_its_setup():
    from rosa_ds.hf.checks import RosaTrainerError
    from rosa_ds.hf.setup import prepare_for_trainer
    from rosa_ds.schedule import ScheduleConfig

    with pytest.raises(RosaTrainerError, match="needs args=TrainingArguments"):
        prepare_for_trainer(None, None, None, ScheduleConfig())  # refused, but the words are already set
    assert "per_device_train_batch_size 4 × gradient_accumulation_steps 2" in str(batch_contradiction())


@pytest.mark.parametrize("name, flag, argument", [
    ("micro_batch", "--micro-batch", "per_device_train_batch_size"),
    ("warmup_steps", "--warmup", "warmup_steps"),  # the one kind of field the recipe says by another's flag
    ("total_steps", "--max-steps", "max_steps"),
    ("lr", "--lr", "learning_rate"),
    ("resume", "--resume", "resume_from_checkpoint"),
    ("restart_schedule", "--restart-schedule", "restart_schedule"),  # no TrainingArguments: the field's name
])
def test_words_of_each_front_end(name, flag, argument):
    assert (flag_words(name), trainer_words(name)) == (flag, argument)


def test_only_backquoted_identifiers_the_words_know_are_rendered():
    text = f"run `pip install x` or set {config_field('no_such_field')}; drop {config_field('lr')}"
    assert render_fields(text, flag_words) == "run `pip install x` or set `no_such_field`; drop --lr"
    assert render_fields(text, None) == text
    with field_words(flag_words):
        assert str(ConfigError(text)).endswith("drop --lr")


def recipe_flags() -> set[str]:
    return {flag_name(f.name) for _, f in all_flag_fields()}


def below_the_recipe() -> list[Path]:
    memory = [p for p in (PKG / "memory").rglob("*.py") if p.name != "__main__.py"]  # that CLI owns its flags
    return sorted([*PKG.glob("*.py"), *(PKG / "ds").rglob("*.py"), *memory, *(PKG / "utils").rglob("*.py")])


def flags_in_strings(source: str, flags: set[str]) -> list[tuple[int, str]]:
    """(line, flag) of each of ``flags`` in a string literal of ``source`` that is not a docstring."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, flag) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for flag in FLAG.findall(node.value) if flag in flags]


def test_no_layer_below_the_recipe_writes_a_recipe_flag():
    flags = recipe_flags()
    assert {"--micro-batch", "--resume", "--output-dir", "--precision"} <= flags
    found = [f"{path.relative_to(PKG.parent)}:{line}: {flag}" for path in below_the_recipe()
             for line, flag in flags_in_strings(path.read_text(), flags)]
    assert not found, "name the config field instead (rosa_ds.errors.config_field):\n" + "\n".join(found)


def test_the_guard_sees_flags_in_strings_only():
    source = '"""Run with --micro-batch 4."""\n# --resume\nFLAGS = {"micro_batch": "--micro-batch"}\nx = f"{y} --lr"\n'
    assert flags_in_strings(source, {"--micro-batch", "--resume", "--lr"}) == [(3, "--micro-batch"), (4, "--lr")]
