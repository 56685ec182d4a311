"""The CUDA path, shown on the CPU wherever a CPU can show it: one test per defect a code read found
(a GPU run crashing before its first step, or silently losing precision). The accelerator device is
simulated by ``meta``: a tensor left on the CPU next to it is a device mix that NCCL would reject.
What only a GPU can show is in ``bench/gpu_check.py`` (``make gpu-check``)."""
import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rosa_ds import RosaConfig
from rosa_ds.factorize import new_factors
from rosa_ds.layer import RosaLinear
from tests.helpers.models import ds_test_config, tiny_model

META = torch.device("meta")
SEAM = Path(__file__).resolve().parents[2] / "rosa_ds" / "ds"


class Reached(Exception):
    """Raised by a stand-in to stop a run at the point under test."""


def simulate_accelerator(monkeypatch, dev=META):
    """Every module of the seam that asks for the accelerator device gets ``dev`` (one place)."""
    from tests.helpers import stand_in

    stand_in.install(dev, monkeypatch.setattr)
    assert set(stand_in.seam_devices().values()) == {str(dev)}


def test_initialize_moves_the_model_to_the_accelerator_before_the_first_factorization(monkeypatch):
    """Defect 1: the first resample ran on a CPU-loaded model while the seam made its tensors on
    the GPU (torch.cat across devices)."""
    from rosa_ds.ds import engine, prepare

    simulate_accelerator(monkeypatch)
    monkeypatch.setattr(engine, "init_distributed", lambda *a, **k: None)
    seen = {}

    def first_factorization(model, config, index):
        seen["devices"] = {p.device.type for p in model.parameters()}
        raise Reached

    monkeypatch.setattr(prepare, "distributed_resample", first_factorization)
    with pytest.raises(Reached):
        engine.initialize(tiny_model("gpt2"), RosaConfig(rank=2), config=ds_test_config(2))
    assert seen["devices"] == {"meta"}


def test_init_distributed_selects_the_device_from_local_rank_before_any_collective(monkeypatch):
    """Defect 2: without set_device(LOCAL_RANK) every rank's NCCL collectives run on cuda:0."""
    import deepspeed
    import torch.distributed as tdist

    from rosa_ds.ds import dist

    calls = []

    class FakeCuda:
        def device_name(self):
            return "cuda"

        def set_device(self, index):
            calls.append(("set_device", index))

        def communication_backend_name(self):
            return "nccl"

    monkeypatch.setattr(dist, "get_accelerator", lambda: FakeCuda())
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("init_distributed", kw)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dist.init_distributed()
    assert calls[0] == ("set_device", 1) and calls[1][0] == "init_distributed", calls


def _trainer(monkeypatch, world=2):
    """A Trainer around a fake engine on the simulated accelerator: it records what it is handed."""
    from rosa_ds.recipe.config import parse_args
    from rosa_ds.recipe.methods import method_of
    from rosa_ds.recipe.tasks import task_of
    from rosa_ds.recipe.trainer import Trainer

    simulate_accelerator(monkeypatch)

    class FakeEngine:
        device, global_step, at_boundary = META, 1, True
        optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3}])
        inputs = []
        module = nn.Linear(1, 1)  # the first micro step runs under the activation census of the module

        def __call__(self, **batch):
            FakeEngine.inputs.append({k: v.device.type for k, v in batch.items()})
            return SimpleNamespace(loss=torch.tensor(2.0, device=META))

        def train(self):
            pass

        def eval(self):
            pass

        def backward(self, loss):
            pass

        def step(self):
            return None

        def grad_norm(self):
            return 0.5

        def write_scalars(self, values):
            pass

        ds = SimpleNamespace(skipped_steps=0)

    # rank 1: nothing is written (config.json, metrics.jsonl are rank 0's)
    cfg = parse_args(["--micro-batch", "2"])
    spec = SimpleNamespace(cfg=cfg, rank=1, world=world, out=Path("unused"), tokenizer=SimpleNamespace(pad_token_id=0),
                           method=method_of("rosa"), task=task_of("causal_lm"), data=SimpleNamespace(eval=None),
                           resume=None, facts={})
    trainer = Trainer(spec, FakeEngine(), {"gradient_clipping": 1.0, "fp32": {"enabled": True}})
    return trainer, FakeEngine


def test_training_and_eval_batches_move_to_the_engine_device(monkeypatch):
    """Defect 3: batches stayed on the CPU while the model was on the GPU."""
    trainer, engine = _trainer(monkeypatch)
    batch = trainer.collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    loss, event = trainer.micro_step(batch)
    assert engine.inputs == [{"input_ids": "meta", "attention_mask": "meta", "labels": "meta"}]
    assert loss.device == META and event is None


def test_step_and_eval_reductions_run_on_the_engine_device(monkeypatch):
    """Defect 4: log_step and evaluate all-reduced CPU tensors (NCCL rejects them)."""
    import torch.distributed as tdist

    trainer, _ = _trainer(monkeypatch)
    handed = []

    def all_reduce(t, group=None):
        handed.append(t.device)
        raise Reached

    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    with pytest.raises(Reached):
        trainer.log_step(0, [torch.tensor(1.5, device=META)], 10, 1.0)
    trainer.spec.data.eval = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 3
    with pytest.raises(Reached):
        trainer.evaluator.evaluate(0)
    assert handed == [META, META]


def test_every_tensor_the_seam_creates_names_its_device():
    """By construction: every tensor factory call in rosa_ds/ds passes device=... (a default-device
    tensor is a CPU tensor on a GPU rank)."""
    factories = {"zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "zeros_like"}
    missing = []
    for path in sorted(SEAM.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{path.name}:{node.lineno}")
    assert not missing, missing


def test_collectives_refuse_tensors_off_the_accelerator(monkeypatch):
    from rosa_ds.ds import dist

    simulate_accelerator(monkeypatch)
    with pytest.raises(RuntimeError, match="on cpu was handed to a collective on meta"):
        dist.check_device(torch.zeros(2))
    assert dist.check_device(torch.zeros(2, device=META)).device == META


class FakeDeepSpeed:
    """The DeepSpeed engine surface RosaEngine uses; ``overflow_at`` lists the global steps whose
    update fp16 loss scaling skips (``was_step_applied`` False, ``global_steps`` still counted)."""

    def __init__(self, overflow_at=()):
        self.global_steps, self.overflow_at, self.applied = 0, set(overflow_at), True
        self.module = nn.Linear(2, 2)
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}])

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.global_steps += 1
        self.applied = self.global_steps not in self.overflow_at

    def was_step_applied(self):
        return self.applied

    def zero_optimization_stage(self):
        return 2


def test_fp16_overflow_skipped_steps_do_not_count_in_schedules(monkeypatch):
    """Defect 8: DeepSpeed counts overflow-skipped steps in global_steps; resampling every N
    steps and the re-warmup window count applied steps only."""
    from rosa_ds.ds import engine as ds_engine
    from rosa_ds.ds import resample
    from rosa_ds.schedule import ScheduleConfig

    resampled_at, lrs = [], []
    monkeypatch.setattr(resample, "distributed_resample", lambda *a, **k: resampled_at.append(fake.global_steps)
                        or {"layers": 0})
    monkeypatch.setattr(resample, "reset_factor_state", lambda *a: 0)
    fake = FakeDeepSpeed(overflow_at={2, 5})
    eng = ds_engine.RosaEngine(fake, RosaConfig(rank=1), ScheduleConfig(3, rewarmup_steps=2))
    original = fake.step

    def step():
        lrs.append(fake.optimizer.param_groups[0]["lr"])
        original()

    fake.step = step
    for _ in range(8):
        eng.step()
    # applied steps: global 1, 3, 4 (resample), 6, 7, 8 (resample)
    assert resampled_at == [4, 8] and eng.state.applied_steps == 6
    # re-warmup after the resample at global step 4: lr x 1/2 at step 5 (skipped, so not counted),
    # again x 1/2 at step 6, then x 1 (the window counts applied steps)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0], lrs


def test_factorization_uses_ieee_fp32_matmuls_whatever_the_global_setting(monkeypatch):
    """Defect 11: with TF32 on, the Gram matrix has ~1e-3 relative error and the tail threshold
    (which assumes fp32) no longer picks the vectors to refine."""
    import rosa_ds.factorize as fz

    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    inside = []
    original = fz.drawn_directions
    monkeypatch.setattr(fz, "drawn_directions",
                        lambda *args: inside.append([b.fp32_precision for b in backends]) or original(*args))
    saved = [b.fp32_precision for b in backends]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
        f = new_factors(w, RosaConfig(rank=4), 1, 0)
        after = [b.fp32_precision for b in backends]
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value
    assert inside == [["ieee", "ieee"]] and after == ["tf32", "bf16"]
    assert float((f.w_frozen + f.a @ f.b - w).norm() / w.norm()) < 1e-6


def test_quantization_scales_stay_fp32_when_the_model_is_cast():
    """Defect 12: bitsandbytes' CUDA kernel reads absmax as fp32 bytes; model.to(bf16) cast the
    scales buffer, and a bf16 scale would be read as garbage."""
    pytest.importorskip("bitsandbytes")
    from rosa_ds.quant import QuantizedBase, dequantize

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for kind in ("nf4", "int8"):
        base = QuantizedBase.from_module(nn.Linear(64, 16, bias=False), w, kind)
        reference = base.weight(torch.float32)
        base.to(torch.bfloat16)
        assert base.qscale.dtype == torch.float32
        assert torch.equal(base.weight(torch.float32), reference)
        bf16_scale = base.qscale.to(torch.bfloat16)
        again = dequantize(base.qdata, bf16_scale, 16, 64, kind)
        assert torch.equal(again, dequantize(base.qdata, bf16_scale.float(), 16, 64, kind))


def _bf16_layer(frozen_master: bool, seed: int = 0):
    """A 48x64 layer with W_f stored in bf16 (fp32 factors, as DeepSpeed's fp32 masters of A, B)."""
    torch.manual_seed(seed)
    base = nn.Linear(64, 48, bias=False)
    w0 = base.weight.detach().clone()
    config = RosaConfig(rank=4, frozen_master=frozen_master)
    layer = RosaLinear(base, 4, 0)
    factors = new_factors(w0, config, 0, 0)
    base.to(torch.bfloat16)
    layer.write(factors)
    if config.wants_master(torch.bfloat16):
        layer.set_master(factors.w_frozen)
    return layer, config, w0


def test_bf16_merges_keep_what_was_learned_with_an_fp32_master():
    """Defect 6: re-rounding W_f' = W_f + A B - A' B' to bf16 at every resample drifts away from
    the fp32 run, more with every resample; with the fp32 master, the merged W equals the fp32
    computation to fp32 rounding, however many resamples came before."""
    errors = {}
    for master in (True, False):
        layer, config, w = _bf16_layer(master)
        w = w.double()
        g = torch.Generator().manual_seed(1)
        for k in range(1, 5):
            # a learned update of the factors (1e-3 of their size), then a resample
            da = 1e-3 * torch.randn(layer.rosa_A.shape, generator=g) * layer.rosa_A.detach().norm() / 7
            db = 1e-3 * torch.randn(layer.rosa_B.shape, generator=g) * layer.rosa_B.detach().norm() / 7
            a, b = layer.rosa_A.detach().double(), layer.rosa_B.detach().double()
            w = w + (a + da) @ (b + db) - a @ b  # the fp32 run's merged weight (exact in fp64)
            layer.write_factors(layer.rosa_A.detach() + da, layer.rosa_B.detach() + db)
            layer.write(new_factors(layer.merged_weight(), config, k, 0))
        errors[master] = float((layer.merged_weight().double() - w).norm() / w.norm())
    assert errors[True] < 1e-6, errors
    assert errors[False] > 1e-3, errors  # one bf16 rounding is 2^-9 = 2e-3 relative per value


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_baseline_adapters_take_the_base_dtype(dtype):
    """The PEFT LoRA baseline in bf16: a model DeepSpeed builds bf16 under zero.Init (ZeRO-3) got
    fp32 adapters from PEFT's autocast while ZeRO-2 (the model cast by DeepSpeed) trained bf16 ones;
    the adapters and the trainable head must have the base's dtype whatever the stage."""
    pytest.importorskip("peft")
    from rosa_ds.recipe.baselines import apply_lora

    model = apply_lora(tiny_model("bert-cls").to(dtype), 2, modules_to_save=["classifier"])
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert set(trainable.values()) == {dtype}, trainable


def test_step_time_is_read_after_the_accelerator_finished_the_step(monkeypatch):
    """A GPU returns from step() with its kernels still queued: the clock read before a
    synchronization times the launch, not the step (tokens/s too high)."""
    from rosa_ds.recipe import trainer as trainer_mod

    trainer, _ = _trainer(monkeypatch)
    order = []
    monkeypatch.setattr(trainer_mod, "synchronize", lambda: order.append("synchronize"))
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(perf_counter=lambda: order.append("clock") or 5.0))
    monkeypatch.setattr(trainer_mod, "all_reduce", lambda t: order.append("all_reduce") or t)
    monkeypatch.setattr(trainer.guard, "check", lambda rec: order.append(rec["step_seconds"]))
    trainer.engine.device = torch.device("cpu")  # values to read back; the order is the point
    trainer.log_step(0, [torch.tensor(1.5)], 10, 1.0)
    assert order[:4] == ["synchronize", "clock", "all_reduce", 4.0], order


class FakeGpuMemory:
    """The accelerator memory counters of a GPU whose peak is reset by each phase."""

    def __init__(self):
        self.peak, self.reserved = 0, 0

    def device_name(self):
        return "cuda"

    def reset_peak_memory_stats(self):
        self.peak = self.reserved = 0

    def memory_allocated(self):
        return 0

    def max_memory_allocated(self):
        return self.peak

    def max_memory_reserved(self):
        return self.reserved


def test_the_memory_event_compares_the_whole_runs_device_peak_on_a_gpu(monkeypatch):
    """Per-phase resets hid the run's peak, and on CUDA the record set host RSS beside a
    prediction of device memory: the event carries the device's whole-run peak there."""
    from rosa_ds.ds import dist

    gpu = FakeGpuMemory()
    monkeypatch.setattr(dist, "get_accelerator", lambda: gpu)
    monkeypatch.setattr(dist, "_RUN_PEAK", {"allocated": 0, "reserved": 0})
    dist.PeakMemory()
    gpu.peak, gpu.reserved = 900, 1000  # a resample's high
    step = dist.PeakMemory()  # the next phase resets the counters
    gpu.peak, gpu.reserved = 300, 1000
    assert step.read("train_step")["train_step_peak_bytes"] == 300
    trainer, _ = _trainer(monkeypatch, world=1)
    written = []
    trainer.metrics = SimpleNamespace(write=written.append)
    trainer.spec.fit = SimpleNamespace(need=800, phase="resample", available=10_000)
    trainer.record_peak_rss()
    assert written[0]["compared"] == "device" and written[0]["device_peak_allocated_bytes"] == [900]
    assert written[0]["device_peak_reserved_bytes"] == [1000] and written[0]["predicted_peak_bytes"] == 800
