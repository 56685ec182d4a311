"""ROSA engine on 2 real CPU ranks (gloo) vs a single-process plain-PyTorch AdamW reference."""
import functools
from pathlib import Path

import pytest
import torch

from rosa_ds import RosaConfig, apply_rosa
from tests.helpers.launch import launch_ranks
from tests.helpers.models import adamw_reference, lm_batch, no_dropout_gpt2

SCRIPT = Path(__file__).parent / "scripts" / "engine_rank.py"
STEPS_PER_EPOCH, EPOCHS, MICRO, WORLD, LR = 3, 3, 2, 2, 1e-3


@functools.cache
def reference():
    """Single process, global batch, torch.optim.AdamW, same seeds; state cleared at resample."""
    torch.manual_seed(1234)
    model = apply_rosa(no_dropout_gpt2(), RosaConfig(rank=3, seed=7))
    return adamw_reference(model, lambda step: lm_batch(step, WORLD, MICRO), STEPS_PER_EPOCH, EPOCHS, LR)


GRADS_AT = ["0", "3"]  # the first step, and the first after the first resample (3 steps per epoch)
PLAIN: dict = {}  # stage -> the plain fp32 run of the reference test, reused by the checkpointing test


def run(tmp_path, stage, dtype="fp32", extra=(), nodes=1, world=WORLD):
    merged = tmp_path / f"merged_{stage}_{dtype}.pt"
    results = launch_ranks(SCRIPT, ["--stage", str(stage), "--dtype", dtype, "--merged-out", str(merged),
                                    "--steps-per-epoch", str(STEPS_PER_EPOCH), "--epochs", str(EPOCHS), *extra],
                           world_size=world, timeout=420, nodes=nodes)
    return results, (torch.load(merged) if merged.exists() else None)


def mean_losses(results):
    steps = sorted(results[0]["losses"], key=int)
    return [sum(r["losses"][s] for r in results) / len(results) for s in steps]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_checkpoint_holds_no_full_frozen_copy(ckpt, stage):
    """DeepSpeed's files exclude the frozen weights; the cycle's frozen record holds them once:
    under ZeRO-3 as one partition file per rank (each about half), under ZeRO-2 one replicated copy."""
    model = apply_rosa(no_dropout_gpt2(), RosaConfig(rank=3, seed=7))
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    tag_files = [f for f in (ckpt / "step_00000004").rglob("*") if f.is_file()]
    assert max(f.stat().st_size for f in tag_files) < 0.5 * frozen  # factors, optimizer state, metadata
    record = next(p for p in (ckpt / "frozen").iterdir() if p.is_dir())
    names = sorted(f.name for f in record.iterdir())
    if stage == 3:
        assert names == ["COMPLETE", "rank0-00001.safetensors", "rank1-00001.safetensors"], names
        assert all((record / n).stat().st_size < 0.6 * frozen for n in names[1:])
    else:
        assert names == ["COMPLETE", "replicated-00001.safetensors"], names


def assert_resample_invariants(results):
    n_layers = results[0]["n_layers"]
    assert len(results[0]["resamples"]) == EPOCHS - 1
    for k, events in enumerate(zip(*(r["resamples"] for r in results))):
        assert all(e["checksums"] == events[0]["checksums"] for e in events), f"ranks differ after resample {k + 1}"
        assert all(e["module_eq_master"] for e in events)
        assert all(e["batched_gather_exact"] for e in events)
        assert all(e["state_empty"] and e["n_state_groups"] >= 1 for e in events)  # moments and step gone
        assert all(e["step_after_next_update"] == [1] * len(e["step_after_next_update"]) for e in events)
        assert all(e["frozen_masters_ok"] for e in events)  # masters on owners only, module = master rounded
        svds = [e["svds_here"] for e in events]
        assert sum(svds) == n_layers and min(svds) > 0, f"each layer's SVD once in the world, balanced: {svds}"


def assert_grad_norms_are_the_full_gradients(results):
    """The engine's per-step gradient norm (metrics.jsonl's ``grad_norm``) is the L2 norm of the
    whole reduced gradient before clipping, the same on every rank."""
    for step in GRADS_AT:
        full = torch.tensor([g for factor in results[0]["grads"][step] for g in factor], dtype=torch.float64)
        norms = [r["grad_norms"][step] for r in results]
        assert all(n == norms[0] for n in norms), norms
        assert abs(norms[0] - float(full.norm())) <= 1e-5 * float(full.norm()), (norms[0], float(full.norm()))


@pytest.mark.parametrize("stage, nodes", [(1, 2), (2, 1), (3, 1)])
def test_fp32_matches_single_process_adamw_and_resumes_exactly(tmp_path, stage, nodes):
    ckpt = tmp_path / "ckpt"
    results, merged = run(tmp_path, stage, extra=["--save-at", "4", "--ckpt", str(ckpt), "--grads-at", *GRADS_AT],
                          nodes=nodes)
    PLAIN[stage] = results, merged
    ref_losses, ref_state = reference()
    losses = mean_losses(results)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    assert merged.keys() <= ref_state.keys()
    worst = max(rel(merged[k], ref_state[k]) for k in merged if merged[k].is_floating_point())
    assert worst <= 1e-5, worst
    assert_resample_invariants(results)
    assert_grad_norms_are_the_full_gradients(results)
    if stage == 1:
        return  # resume is required on ZeRO-2 and ZeRO-3; stage 1 shows the 2-node layout
    assert_checkpoint_holds_no_full_frozen_copy(ckpt, stage)
    # resume in new processes from the checkpoint taken after the first resample (step 3)
    resumed, merged_resumed = run(tmp_path / "..", stage, extra=["--resume", str(ckpt)])
    for r_full, r_res in zip(results, resumed):
        tail = {s: v for s, v in r_full["losses"].items() if int(s) >= 4}
        assert r_res["losses"] == tail, "resumed losses must equal the uninterrupted run bit for bit"
    assert all(torch.equal(merged[k], merged_resumed[k]) for k in merged)


def test_plain_sgd_matches_single_process_torch_sgd(tmp_path):
    """--optim sgd (the paper's optimizer, no momentum) on 2 ZeRO-2 ranks equals torch.optim.SGD in
    one process, across resamples (SGD keeps no state: nothing to reset, the step is exact)."""
    results, merged = run(tmp_path, 2, extra=["--sgd"])
    torch.manual_seed(1234)
    model = apply_rosa(no_dropout_gpt2(), RosaConfig(rank=3, seed=7))
    ref_losses, ref_state = adamw_reference(model, lambda step: lm_batch(step, WORLD, MICRO), STEPS_PER_EPOCH,
                                            EPOCHS, LR, optimizer="sgd")
    losses = mean_losses(results)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    assert max(rel(merged[k], ref_state[k]) for k in merged if merged[k].is_floating_point()) <= 1e-5
    assert len(results[0]["resamples"]) == EPOCHS - 1


@pytest.mark.parametrize("stage", [2, 3])
def test_activation_checkpointing_gives_the_same_gradients_across_a_resample(tmp_path, stage):
    """Non-reentrant checkpointing on the frozen-base model under ZeRO-2/3: every factor's reduced
    gradient, at the first step and at the first step after a resample, equals the run without
    checkpointing to 1e-6 relative; so do the losses and the merged model."""
    if stage not in PLAIN:  # run alone (e.g. with -k): make the plain run here
        (tmp_path / "plain").mkdir()
        PLAIN[stage] = run(tmp_path / "plain", stage, extra=["--grads-at", *GRADS_AT])
    plain, merged_plain = PLAIN[stage]
    results, merged = run(tmp_path, stage, extra=["--checkpointing", "--grads-at", *GRADS_AT])
    assert_resample_invariants(results)
    for r_plain, r_ckpt in zip(plain, results):
        assert sorted(r_ckpt["grads"]) == GRADS_AT
        for step in GRADS_AT:
            for g0, g1 in zip(r_plain["grads"][step], r_ckpt["grads"][step]):
                g0, g1 = torch.tensor(g0), torch.tensor(g1)
                assert torch.linalg.vector_norm(g1 - g0) <= 1e-6 * torch.linalg.vector_norm(g0), step
        assert all(abs(r_ckpt["losses"][k] - v) <= 1e-6 * abs(v) for k, v in r_plain["losses"].items())
    assert max(rel(merged[k], merged_plain[k]) for k in merged if merged[k].is_floating_point()) <= 1e-6


@pytest.mark.parametrize("stage, flag", [(2, "--offload"), (3, "--client-adamw")])
def test_offload_and_client_optimizer_match_reference(tmp_path, stage, flag):
    """ZeRO-2 with optimizer CPU offload (DeepSpeed CPU Adam) and ZeRO-3 with a client torch AdamW:
    the same reference, through two resamples (CPU Adam's fused update rounds differently, 1e-5)."""
    results, merged = run(tmp_path, stage, extra=[flag])
    ref_losses, ref_state = reference()
    losses = mean_losses(results)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= 1e-5, (losses, ref_losses)
    worst = max(rel(merged[k], ref_state[k]) for k in merged if merged[k].is_floating_point())
    assert worst <= 1e-5, worst
    assert_resample_invariants(results)


@pytest.mark.parametrize("stage, extra", [(2, []), (3, []), (1, ["--grad-accum-fp32"])])
def test_bf16_tracks_fp32_reference_and_resumes_exactly(tmp_path, stage, extra):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2% per value); weights, activations
    and gradients are rounded each step while masters and moments stay fp32, so losses over 9
    steps stay within 1% of the fp32 reference, and the merged weights within 1%. The fp32 masters
    of W_f (on by default in bf16) live on each layer's owner only, the module's W_f is the master
    rounded once, and a checkpoint restores them: the resumed run equals the uninterrupted one bit
    for bit. ZeRO-1 with fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer."""
    ckpt = tmp_path / "ckpt"
    results, merged = run(tmp_path, stage, "bf16", extra=[*extra, "--save-at", "4", "--ckpt", str(ckpt)])
    ref_losses, ref_state = reference()
    losses = mean_losses(results)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= 1e-2, (losses, ref_losses)
    worst = max(rel(merged[k].float(), ref_state[k]) for k in merged if merged[k].is_floating_point())
    assert worst <= 1e-2, worst
    assert_resample_invariants(results)
    for e0, e1 in zip(results[0]["resamples"], results[1]["resamples"]):
        assert e0["frozen_masters_here"] + e1["frozen_masters_here"] == results[0]["n_layers"]
        assert min(e0["frozen_masters_here"], e1["frozen_masters_here"]) > 0
    if stage == 1:
        return
    resumed, merged_resumed = run(tmp_path / "..", stage, "bf16", extra=[*extra, "--resume", str(ckpt)])
    for r_full, r_res in zip(results, resumed):
        assert r_res["losses"] == {s: v for s, v in r_full["losses"].items() if int(s) >= 4}
    assert all(torch.equal(merged[k], merged_resumed[k]) for k in merged)


def test_checkpoint_not_shared_by_all_nodes_fails_at_save_on_every_rank(tmp_path):
    """Node-local checkpoint directories (simulated: one per rank): rank 0 publishes a checkpoint
    that rank 1 cannot see. The save fails on every rank, naming the rank and host that cannot see
    it, instead of leaving rank 1's shards in a .partial directory for a later resume to hang on."""
    with pytest.raises(RuntimeError) as info:
        run(tmp_path, 2, extra=["--save-at", "3", "--ckpt", str(tmp_path / "ckpt"), "--node-local-ckpt"])
    text = str(info.value)
    assert "was not saved on every node: rank 1 on" in text and "COMPLETE is not visible here" in text
    assert "one filesystem that every node sees" in text
    assert "rank 0 on" not in text.split("was not saved on every node")[1].split("\n")[0]


def test_resume_with_different_rank_or_world_is_refused_before_deepspeed(tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tmp_path, 2, extra=["--save-at", "3", "--ckpt", str(ckpt), "--stop-at", "3"])
    with pytest.raises(RuntimeError, match=r"cannot resume from .*rank: checkpoint 3, this run 4"):
        run(tmp_path, 2, extra=["--resume", str(ckpt), "--rank", "4"])
    with pytest.raises(RuntimeError, match=r"cannot resume from .*world_size: checkpoint 2, this run 1"):
        run(tmp_path, 2, extra=["--resume", str(ckpt)], world=1)
