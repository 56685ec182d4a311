"""One rank of ``RosaTrainer`` runs (started by the ``deepspeed`` launcher or ``accelerate
launch``) on a tiny Llama; the ``trl_*`` cases use TRL's own ``SFTTrainer`` through the three
entry points: ``with_rosa(SFTTrainer)(rosa_config=...)``, ``peft_config=RosaConfig`` with the
model given by path, and ``SFTTrainer(callbacks=[RosaCallback(...)])`` alone.

For each case (``CASES``: ZeRO-2, ZeRO-3) first trains the rosa_ds engine on the same model, data
order, seed, optimizer and LR schedule (the reference), then the Trainer, then maybe a resume in
a fresh Trainer and model. Records per-step losses, after every resample the checksums of W_f, A,
B and the fp32 masters and the optimizer state of the factors and of the head, and at the end the
eval loss; writes ``rank<r>.json`` into ``--result-dir``. One launch for all cases: the process
start is most of a case's time on CPU.
"""
import argparse
import copy
import hashlib
import json
from pathlib import Path

import torch
import transformers as tf

import rosa_ds
from rosa_ds import RosaConfig
from rosa_ds.ds.dist import all_gather_object, init_distributed, shutdown_distributed
from rosa_ds.ds.optim import flat_groups
from rosa_ds.ds.params import full_fp32, gathered, settle
from rosa_ds.hf import RosaCallback, RosaTrainer
from rosa_ds.inject import iter_rosa_layers
from rosa_ds.schedule import ScheduleConfig
from rosa_ds.utils.dist import exit_now
from tests.helpers.models import ds_test_config

# the runs of one launch: a Trainer per case (and the engine reference, and a resume if asked)
CASES = {
    # 3 epochs of 4 steps, a resample at each epoch end but the last, eval each epoch, TensorBoard
    "zero2": dict(stage=2, gas=1, epochs=3, max_steps=-1, resample_every="epoch", save_steps=0, resume_step=0,
                  tensorboard=True),
    # gradient accumulation 2, 5 steps, a resample every 2; resumed from the checkpoint after step 3
    "zero3": dict(stage=3, gas=2, epochs=3, max_steps=5, resample_every="2", save_steps=3, resume_step=3,
                  tensorboard=False),
    # TRL SFTTrainer, with_rosa(...)(model=<object>, rosa_config=...): 2 epochs of 4 steps
    "trl_zero2": dict(stage=2, gas=1, epochs=2, max_steps=-1, resample_every="epoch", save_steps=0, resume_step=0,
                      tensorboard=False, entry="with_rosa"),
    # TRL SFTTrainer, with_rosa(...)(model="<path>", peft_config=RosaConfig): 4 steps, every 2: no
    # resample after the final step 4
    "trl_zero3": dict(stage=3, gas=2, epochs=3, max_steps=4, resample_every="2", save_steps=0, resume_step=0,
                      tensorboard=False, entry="peft_config"),
    # TRL SFTTrainer with RosaCallback alone (factors only: the Trainer builds one param group)
    "trl_callback_zero3": dict(stage=3, gas=1, epochs=2, max_steps=6, resample_every="3", save_steps=0,
                               resume_step=0, tensorboard=False, entry="callback"),
}
p = argparse.ArgumentParser()
p.add_argument("--model-dir", required=True)
p.add_argument("--out", required=True, help="each case writes into OUT/<case> (merged model: OUT/<case>/merged)")
p.add_argument("--result-dir", required=True)
p.add_argument("--cases", nargs="+", default=["zero2", "zero3"], choices=list(CASES))
p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
p.add_argument("--accelerate-config", help="the DeepSpeed config file accelerate launch was given (its case's)")
cli = p.parse_args()

MICRO, SEQ, N, LR, WD, WARMUP = 2, 16, 16, 1e-3, 0.01, 1
ROSA = RosaConfig(rank=2, seed=7, modules_to_save=("lm_head",))
FACTORS_ONLY = RosaConfig(rank=2, seed=7)
g = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 128, (N, SEQ), generator=g)  # fixed length: every micro-batch weighs the same tokens
DATA = [{"input_ids": ids, "labels": ids.clone()} for ids in IDS]


def rosa_of(a) -> RosaConfig:
    return FACTORS_ONLY if getattr(a, "entry", "") == "callback" else ROSA


def ds_config(a) -> dict:
    cfg = ds_test_config(a.stage, "fp32", MICRO, lr=LR)
    cfg["gradient_accumulation_steps"] = a.gas
    return cfg


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def micro_batches(rank: int, world: int) -> list[dict]:
    """This rank's micro-batches of one epoch in the order the Trainer feeds them (sequential
    sampler, accelerate's sharding: global batch j goes to rank j % world)."""
    out = []
    for j in range(rank, N // MICRO, world):
        ids = IDS[j * MICRO:(j + 1) * MICRO]
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def step_mean(value: float) -> float:
    """Per-step loss: this rank's mean over the step's micro-batches, then the mean over ranks."""
    return sum(all_gather_object(value)) / torch.distributed.get_world_size()


def reference_losses(a) -> list[float]:
    """The rosa_ds engine on the same model, batches, optimizer, schedule and resample schedule."""
    model = tf.AutoModelForCausalLM.from_pretrained(cli.model_dir)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = micro_batches(rank, world)
    per_epoch = len(batches) // a.gas
    total = per_epoch * a.epochs if a.max_steps < 0 else a.max_steps
    engine = rosa_ds.initialize(model, copy.deepcopy(rosa_of(a)), config=ds_config(a),
                                schedule=ScheduleConfig(a.resample_every),
                                lr_scheduler=lambda opt: tf.get_scheduler("linear", opt, WARMUP, total))
    losses, micro, step = [], [], 0
    for epoch in range(a.epochs):
        for batch in batches[:per_epoch * a.gas]:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            micro.append(loss.item())
            if len(micro) == a.gas:
                losses.append(step_mean(sum(micro) / len(micro)))
                micro, step = [], step + 1
            if step == total:
                return losses
        engine.end_epoch(epoch, a.epochs)
    return losses


class Recorder:
    """Records each training micro-batch and its loss (the Trainer's, normalized by the tokens of
    the whole accumulated step: summed over the step it is the step's mean loss)."""

    micro: list = []
    inputs_seen: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.micro.append((out[0] if return_outputs else out).item())
            self.inputs_seen.append(inputs["input_ids"].cpu())
        return out


class Recording(Recorder, RosaTrainer):
    """RosaTrainer, recorded."""


def rosa_run(trainer):
    """The trainer's RosaRun: its own (with_rosa) or the RosaCallback's (used alone)."""
    if hasattr(trainer, "rosa"):
        return trainer.rosa
    return next(c.run for c in trainer.callback_handler.callbacks if isinstance(c, RosaCallback))


def after_resample(trainer) -> dict:
    """sha256 of full W_f, A, B and the fp32 masters of A, B and the head; optimizer state sizes."""
    engine = trainer.deepspeed
    settle(engine)
    sums = []
    for _, layer in iter_rosa_layers(trainer.model):
        masters = [digest(full_fp32(layer.rosa_A)), digest(full_fp32(layer.rosa_B))]
        with gathered([layer.base_layer.weight, layer.rosa_A, layer.rosa_B]):
            sums.append([digest(layer.base_layer.weight), digest(layer.rosa_A), digest(layer.rosa_B), *masters])
    if trainer.model.lm_head.weight.requires_grad:
        sums.append(digest(full_fp32(trainer.model.lm_head.weight)))
    factor_ids = {id(p) for p in rosa_run(trainer).factor_params}
    state = engine.optimizer.optimizer.state
    groups = [({id(q) for q in params} <= factor_ids, len(state.get(flat, {}))) for params, flat, _ in
              flat_groups(engine.optimizer)]
    return {"step": trainer.state.global_step, "sums": sums,
            "factor_state_sizes": [n for is_factor, n in groups if is_factor],
            "head_state_sizes": [n for is_factor, n in groups if not is_factor]}


class Checks(tf.TrainerCallback):
    """Runs after RosaCallback (which the Trainer calls first): sees each step's resample."""

    def __init__(self) -> None:
        self.trainer, self.seen, self.resamples, self.losses = None, 0, [], {}

    def on_step_end(self, args, state, control, **kwargs):
        self.losses[state.global_step] = step_mean(sum(Recorder.micro))  # each is already divided by the step's tokens
        Recorder.micro.clear()
        run = rosa_run(self.trainer)
        if run.state.resamples > self.seen:
            self.seen = run.state.resamples
            self.resamples.append(after_resample(self.trainer))


def training_args(a, out: str, resume_step: int):
    kw = dict(
        output_dir=out, per_device_train_batch_size=MICRO, per_device_eval_batch_size=MICRO,
        gradient_accumulation_steps=a.gas, num_train_epochs=a.epochs, max_steps=a.max_steps, learning_rate=LR,
        weight_decay=WD, lr_scheduler_type="linear", warmup_steps=WARMUP, max_grad_norm=0.0, logging_steps=1,
        save_strategy="steps" if a.save_steps and not resume_step else "no", save_steps=a.save_steps or 500,
        eval_strategy="epoch" if a.tensorboard else "no",
        report_to=["tensorboard"] if a.tensorboard else "none",
        deepspeed=None if cli.accelerate_config else ds_config(a),  # accelerate launch: its own config file
        train_sampling_strategy="sequential", average_tokens_across_devices=False, seed=0, use_cpu=True,
        disable_tqdm=True)
    if not hasattr(a, "entry"):
        return tf.TrainingArguments(**kw)
    from trl import SFTConfig

    return SFTConfig(**kw, bf16=False, max_length=None, dataset_num_proc=None)


def trl_trainer(a, args, checks: tf.TrainerCallback):
    """TRL's SFTTrainer through entry point ``a.entry`` (the model loaded after the arguments)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from rosa_ds.hf import with_rosa

    data = dict(train_dataset=Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in DATA]),
                eval_dataset=Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in DATA[:8]]))
    schedule = ScheduleConfig(a.resample_every)
    if a.entry == "with_rosa":
        model = tf.AutoModelForCausalLM.from_pretrained(cli.model_dir)
        return type("R", (Recorder, with_rosa(SFTTrainer)), {})(
            model=model, args=args, rosa_config=ROSA, schedule=schedule, callbacks=[checks], **data)
    if a.entry == "peft_config":
        return type("R", (Recorder, with_rosa(SFTTrainer)), {})(
            model=str(cli.model_dir), args=args, peft_config=ROSA, schedule=schedule, callbacks=[checks], **data)
    model = tf.AutoModelForCausalLM.from_pretrained(cli.model_dir)
    return type("R", (Recorder, SFTTrainer), {})(
        model=model, args=args, callbacks=[RosaCallback(FACTORS_ONLY, schedule), checks], **data)


def save_merged(trainer, out: str) -> None:
    if hasattr(trainer, "rosa"):
        trainer.save_model(out)
    else:
        next(c for c in trainer.callback_handler.callbacks if isinstance(c, RosaCallback)).save_merged(out)


def train(a, resume_step: int = 0) -> dict:
    """One Trainer run (``resume_step``: resumed from ``--out/checkpoint-<step>`` in a fresh
    Trainer and model); its losses, resample checks, data order, eval loss and final checksums."""
    Recorder.micro.clear()
    Recorder.inputs_seen.clear()
    out = f"{cli.out}/{a.name}" + ("-resumed" if resume_step else "")
    args = training_args(a, out, resume_step)
    checks = Checks()
    if hasattr(a, "entry"):
        trainer = trl_trainer(a, args, checks)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(cli.model_dir)  # after the arguments: partitioned (ZeRO-3)
        trainer = Recording(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:8], rosa_config=ROSA,
                            schedule=ScheduleConfig(a.resample_every), callbacks=[checks])
    checks.trainer = trainer
    trainer.train(resume_from_checkpoint=f"{cli.out}/{a.name}/checkpoint-{resume_step}" if resume_step else None)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seen = [t.tolist() for t in Recorder.inputs_seen]
    expected = [b["input_ids"].tolist() for b in micro_batches(rank, world)] * a.epochs
    skip = resume_step * a.gas  # micro-batches before the resume
    result = {"losses": checks.losses, "resamples": checks.resamples, "events": rosa_run(trainer).state.events,
              "order_ok": seen == expected[skip:skip + len(seen)],
              "logged_resamples": [[e["step"], e["rosa_resamples"]] for e in trainer.state.log_history
                                   if "rosa_resamples" in e],
              "partitioned": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
              "eval_loss": trainer.evaluate()["eval_loss"], "final": after_resample(trainer)["sums"]}
    if not resume_step:
        save_merged(trainer, f"{cli.out}/{a.name}/merged")
    return result


init_distributed()
result = {"eval_ids": IDS[:8].tolist()}
for name in cli.cases:
    case = argparse.Namespace(name=name, **CASES[name])
    result[name] = {"reference_losses": reference_losses(case), "run": train(case)}
    if case.resume_step:
        result[name]["resumed"] = train(case, case.resume_step)
rank = torch.distributed.get_rank()
Path(cli.result_dir).mkdir(parents=True, exist_ok=True)
(Path(cli.result_dir) / f"rank{rank}.json").write_text(json.dumps(result))
shutdown_distributed()
exit_now(0)
