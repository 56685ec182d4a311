"""RosaTrainer without DeepSpeed (one process, plain PyTorch) against the one-process reference,
its resume, and the setups it refuses (one line each, naming the flag)."""
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from rosa_ds import RosaConfig, apply_rosa
from rosa_ds.hf import RosaTrainer, RosaTrainerError
from rosa_ds.hf.checks import check_training_args
from rosa_ds.layer import is_adapter_param
from rosa_ds.schedule import ScheduleConfig
from tests.helpers.models import adamw_reference, tiny_model

N, SEQ, BATCH, EPOCHS, LR, WD = 8, 16, 4, 2, 1e-3, 0.01
ROSA = RosaConfig(rank=2, seed=7, modules_to_save=("lm_head",))
IDS = torch.randint(0, 128, (N, SEQ), generator=torch.Generator().manual_seed(0))


def batch(step: int) -> dict:
    i = step % (N // BATCH) * BATCH
    return {"input_ids": IDS[i:i + BATCH], "labels": IDS[i:i + BATCH].clone()}


class Recording(RosaTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(loss.item())
        return loss


class StateAfterResample(TrainerCallback):
    """Optimizer-state sizes of the factors and of the head after each resample (runs after RosaCallback)."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.rosa.state.resamples > len(self.seen):
            opt = self.trainer.optimizer.optimizer  # under accelerate's wrapper
            self.seen.append([(is_adapter_param(n), len(opt.state.get(p, {})))
                              for n, p in self.trainer.model.named_parameters() if p.requires_grad])


def make_trainer(out, save_steps: int = 0):
    import transformers as tf

    args = tf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
        weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", use_cpu=True, report_to="none", logging_steps=1, disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in IDS]
    trainer = Recording(model=tiny_model("llama"), args=args, train_dataset=data, rosa_config=ROSA,
                        schedule=ScheduleConfig("epoch"))
    trainer.losses = []
    return trainer


def test_plain_pytorch_matches_the_reference_and_resumes_exactly(tmp_path):
    import transformers as tf

    ref_losses, ref_merged = adamw_reference(apply_rosa(tiny_model("llama"), ROSA), batch, N // BATCH, EPOCHS, LR, WD)
    trainer = make_trainer(tmp_path / "run", save_steps=1)
    probe = StateAfterResample(trainer)
    trainer.add_callback(probe)
    trainer.train()
    assert [e["step"] for e in trainer.rosa.state.events] == [2]
    assert max(abs(a - b) / b for a, b in zip(trainer.losses, ref_losses)) <= 1e-5, (trainer.losses, ref_losses)
    (sizes,) = probe.seen  # after the resample: factors have no state, the head keeps its Adam state
    assert all(n == 0 for is_factor, n in sizes if is_factor) and all(n > 0 for f, n in sizes if not f)
    trainer.save_model(str(tmp_path / "merged"))
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, ref in ref_merged.items():
        torch.testing.assert_close(merged[key], ref, rtol=1e-5, atol=1e-6, msg=key)

    resumed = make_trainer(tmp_path / "resumed")  # from step 1, before the resample after step 2
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.losses == trainer.losses[1:]
    assert resumed.rosa.state.resamples == 1
    for (name, a), b in zip(resumed.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), name


def args_ns(**kw):
    return SimpleNamespace(**{"fsdp": "", "optim": "adamw_torch", "deepspeed": None, **kw})


@pytest.mark.parametrize("args, schedule, flag", [
    (args_ns(fsdp=True), ScheduleConfig(), "--fsdp"),
    (args_ns(optim="galore_adamw"), ScheduleConfig(), "--optim galore_adamw"),
    (args_ns(), ScheduleConfig(rewarmup_steps=2), "rewarmup_steps"),
    (args_ns(deepspeed="z0.json", hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 0}})),
     ScheduleConfig(), "zero_optimization.stage 0"),
    (None, ScheduleConfig(), "TrainingArguments"),
])
def test_refused_setups_get_one_line_naming_the_setting(args, schedule, flag):
    with pytest.raises(RosaTrainerError) as err:
        check_training_args(args, schedule)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_a_user_optimizer_is_split_so_the_factors_have_a_group_of_their_own(tmp_path):
    import transformers as tf

    model = apply_rosa(tiny_model("llama"), ROSA)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)  # ignores frozen params: all in one group
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = RosaTrainer(model=model, args=args, optimizers=(opt, None))
    trainer.create_optimizer()
    factor_ids = {id(p) for n, p in model.named_parameters() if is_adapter_param(n)}
    kinds = [{id(p) in factor_ids for p in g["params"]} for g in opt.param_groups]
    assert {True} in kinds and {False} in kinds and len(kinds) == 2
    assert all(g["lr"] == 3e-4 and g["weight_decay"] == 0.1 for g in opt.param_groups)
    with pytest.raises(RosaTrainerError, match="rosa_config"):
        RosaTrainer(model=tiny_model("llama"), args=args)


# --- RosaCallback alone, TRL-style entry points, and what they refuse ------------------------------

FACTORS_ONLY = RosaConfig(rank=2, seed=7)


def plain_args(out, **kw):
    import transformers as tf

    return tf.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
        weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0, optim="adamw_torch",
        train_sampling_strategy="sequential", use_cpu=True, report_to="none", logging_steps=1, disable_tqdm=True,
        save_strategy="no", seed=0, **kw)


def test_rosa_callback_alone_in_a_plain_trainer_matches_the_reference(tmp_path):
    """``Trainer(callbacks=[RosaCallback(config, ScheduleConfig(2))])`` and nothing else from
    rosa_ds: 2 epochs of 2 steps resample after step 2 only (not after the final step 4), losses
    equal the one-process reference, resamples land in log_history, the merged model reloads."""
    import transformers as tf

    from rosa_ds.hf import RosaCallback

    ref_losses, ref_merged = adamw_reference(apply_rosa(tiny_model("llama"), FACTORS_ONLY), batch, N // BATCH, EPOCHS,
                                             LR, WD)
    class Plain(tf.Trainer):  # a plain Trainer that records its training losses (unrounded)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(loss.item())
            return loss

    callback, losses = RosaCallback(FACTORS_ONLY, ScheduleConfig(2)), []
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in IDS]
    trainer = Plain(model=tiny_model("llama"), args=plain_args(tmp_path / "run"), train_dataset=data,
                    callbacks=[callback])
    trainer.train()
    assert [e["step"] for e in callback.run.state.events] == [2]
    logged = [(e["step"], e["rosa_resamples"]) for e in trainer.state.log_history if "loss" in e]
    assert logged == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert len(losses) == 4 and max(abs(a - b) / b for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    callback.save_merged(tmp_path / "merged")
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for key, ref in ref_merged.items():
        torch.testing.assert_close(merged[key], ref, rtol=1e-5, atol=1e-6, msg=key)


def test_model_by_path_and_peft_config_rosa_in_a_trl_style_trainer(tmp_path):
    """``with_rosa(Trainer)(model="<dir>", peft_config=RosaConfig(...))`` loads the model and applies ROSA."""
    import transformers as tf

    from rosa_ds.hf import with_rosa
    from rosa_ds.inject import iter_rosa_layers

    tiny_model("llama").save_pretrained(tmp_path / "model")
    trainer = with_rosa(tf.Trainer)(model=str(tmp_path / "model"), args=plain_args(tmp_path / "run"),
                                    peft_config=FACTORS_ONLY)
    assert len(list(iter_rosa_layers(trainer.model))) == 14 and trainer.rosa.state.rosa_config.rank == 2


def test_trl_style_refusals_are_one_line(tmp_path):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from rosa_ds.hf import RosaCallback, with_rosa

    args = plain_args(tmp_path / "run")
    cases = [
        (lambda: with_rosa(tf.Trainer)(model=tiny_model("llama"), args=args, peft_config=LoraConfig(r=2)),
         "peft_config=LoraConfig(...) cannot be combined with ROSA"),
        (lambda: RosaTrainer(model=get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])),
                             args=args, rosa_config=ROSA), "the model is a PEFT model"),
        (lambda: tf.Trainer(model=tiny_model("llama"), args=args, callbacks=[RosaCallback(None)]),
         "rosa_config=RosaConfig(rank=...)"),
        (lambda: RosaCallback(LoraConfig(r=2)), "takes a rosa_ds.RosaConfig, got LoraConfig"),
        (lambda: RosaTrainer(model=str(tmp_path / "missing"), args=args, rosa_config=ROSA), "could not be loaded"),
    ]
    for make, text in cases:
        with pytest.raises(RosaTrainerError) as err:
            make()
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    data = [{"input_ids": IDS[0], "labels": IDS[0]}]
    late = tf.Trainer(model=tiny_model("llama"), args=args, train_dataset=data)
    late.add_callback(RosaCallback(FACTORS_ONLY))
    with pytest.raises(RosaTrainerError, match="pass callbacks=\\[RosaCallback"):
        late.train()
    head = tf.Trainer(model=tiny_model("llama"), args=args, train_dataset=data, callbacks=[RosaCallback(ROSA)])
    with pytest.raises(RosaTrainerError, match="mixes ROSA factors .* with_rosa"):  # lm_head shares the group
        head.train()


def test_template_scheduler_dropped_and_cpu_bf16_warned(caplog):
    """The project's templates' WarmupDecayLR ("auto" values) yields to the Trainer's schedule;
    a scheduler written out in full stays. bf16 on a CPU is said once."""
    import json
    from pathlib import Path

    from rosa_ds.hf.setup import drop_template_scheduler, warn_cpu_bf16

    template = json.loads((Path(__file__).parents[2] / "ds_configs" / "zero2.json").read_text())
    assert template["scheduler"]["type"] == "WarmupDecayLR"
    args = SimpleNamespace(lr_scheduler_type="cosine", bf16=True, device=torch.device("cpu"))
    drop_template_scheduler(template, args)
    assert "scheduler" not in template and "lr_scheduler_type=cosine drives the learning rate" in caplog.text
    explicit = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    drop_template_scheduler(explicit, args)
    assert "scheduler" in explicit
    warn_cpu_bf16(args)
    assert "bf16=True on a CPU" in caplog.text and "bf16=False" in caplog.text
