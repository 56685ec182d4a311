"""The trainer's parts, each alone: the divergence guard, the evaluator, the method and task
strategies, the frozen run spec."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from rosa_ds.errors import ConfigError
from rosa_ds.recipe.faults import Diverged
from rosa_ds.recipe.guard import DivergenceGuard
from rosa_ds.recipe.methods import METHODS, method_of
from rosa_ds.recipe.tasks import TASKS, task_of


def guard(policy: str, dropped: list, limit: int = 2, precision: str = "fp32") -> DivergenceGuard:
    """A guard whose DeepSpeed skipped-step counter reads from ``dropped`` (one value per check)."""
    counts = iter(dropped)
    return DivergenceGuard(policy, limit, precision, lambda: next(counts), lambda: "the last good checkpoint is X")


def test_guard_stop_names_the_step_and_where_to_resume():
    exc = guard("stop", [0]).check({"step": 7, "loss": math.nan})
    assert isinstance(exc, Diverged) and "non-finite loss at step 7 (--nan-policy stop)" in str(exc)
    assert "the last good checkpoint is X" in str(exc)


def test_guard_skip_counts_dropped_steps_and_stops_at_the_limit():
    g = guard("skip", [1, 2, 2, 3, 4])  # DeepSpeed dropped steps 1, 2, 4, 5; step 3 was fine
    recs = [{"step": s, "loss": math.nan if s != 3 else 1.0} for s in range(1, 6)]
    assert g.check(recs[0]) is None and recs[0]["skipped"] and recs[0]["skipped_total"] == 1
    assert isinstance(g.check(recs[1]), Diverged)  # two in a row: the limit
    assert g.check(recs[2]) is None and g.in_row == 0  # a finite step resets the run of drops
    assert g.check(recs[3]) is None and recs[3]["skipped_total"] == 3


def test_guard_refuses_a_non_finite_step_deepspeed_applied():
    exc = guard("skip", [0]).check({"step": 2, "loss": math.inf})
    assert isinstance(exc, Diverged) and "DeepSpeed applied the step anyway" in str(exc)


def test_fp16_drops_are_loss_scaling_not_divergence():
    assert guard("stop", [1], precision="fp16").check({"step": 1, "loss": 2.0}) is None


class FakeLM:
    """Returns a fixed loss per batch (the mean over its target tokens, as transformers does)."""

    device = torch.device("cpu")
    global_step = 0
    module = None

    def zero_optimization_stage(self):
        return 2

    def __init__(self, losses):
        self.losses = iter(losses)

    def eval(self):
        pass

    def __call__(self, input_ids, attention_mask, labels):
        return SimpleNamespace(loss=torch.tensor(next(self.losses)))


def test_evaluator_weights_each_batch_by_its_scored_tokens():
    from rosa_ds.recipe.evaluate import Evaluator

    split = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},  # 2 scored tokens (shifted labels)
             {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},  # 3
             {"input_ids": [1, 2], "labels": [1, 2]}]  # 1
    written = []
    spec = SimpleNamespace(rank=0, world=1, tokenizer=SimpleNamespace(pad_token_id=0), task=task_of("causal_lm"),
                           cfg=SimpleNamespace(micro_batch=2, data=SimpleNamespace(num_samples=0)),
                           data=SimpleNamespace(eval=split, eval_prompts=[]))
    ev = Evaluator(spec, FakeLM([1.0, 4.0]), SimpleNamespace(write=written.append))
    rec = ev.evaluate(1)
    # batch 1 = samples 0, 1 (2 + 3 tokens at loss 1.0), batch 2 = sample 2 (1 token at 4.0)
    assert rec["eval_loss"] == pytest.approx((5 * 1.0 + 1 * 4.0) / 6) and written == [rec] and ev.last is rec
    assert rec["samples"] == []


def test_classification_scores_samples_and_gathers_its_predictions():
    task = task_of("classification")
    seen = {}
    out = SimpleNamespace(logits=torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    task.observe(seen, out, {"labels": torch.tensor([1, 1])}, [4, 6])
    assert task.scored({}, 2) == 2 and seen["preds"] == [1, 0] and [i for i, _ in seen["rows"]] == [4, 6]
    written = []
    ev = SimpleNamespace(label_names=["a", "b"], gather=lambda v: v, write_predictions=written.append)
    rec = task.finish(seen, ev)
    assert rec["accuracy"] == 0.5 and len(written[0]) == 2


def test_each_method_refuses_the_options_of_another_in_one_line():
    from rosa_ds.recipe.config import parse_args

    with pytest.raises(ConfigError, match="--quantize-base applies to --method rosa only .got --method lora.; fix: "
                                          "drop --quantize-base or use --method rosa"):
        parse_args(["--method", "lora", "--quantize-base", "nf4"])
    with pytest.raises(ConfigError, match="--lora-init applies to --method lora only .got --method full."):
        parse_args(["--method", "full", "--lora-init", "paper"])


def test_registries_drive_the_command_line_and_the_defaults():
    from rosa_ds.recipe.config import TrainConfig, parse_args

    method = [f for f in dataclasses.fields(TrainConfig) if f.name == "method"][0]
    assert set(METHODS) == {"rosa", "lora", "full"} and set(TASKS) == {"causal_lm", "classification"}
    assert method.metadata["choices"] == tuple(METHODS)
    assert parse_args(["--method", "full"]).lr == method_of("full").default_lr("causal_lm") == 2e-5
    cls = parse_args(["--task", "classification"])
    assert cls.lr == 2e-3 and cls.output_dir == "runs/default-cls" and cls.data.max_eval_samples == 200
    assert method_of("rosa").resume_facts(cls) == {"rank": 8, "quantize_base": None}
    assert method_of("full").resume_facts(cls) == {}


def test_run_spec_is_frozen():
    from rosa_ds.recipe.spec import RunSpec

    spec = RunSpec(*[None] * len(dataclasses.fields(RunSpec)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.ds_config = {}
