"""The planner: every configuration of a fine-tuning run that fits a memory budget, best first.

For a model (its config; meta device, no weights) and a cluster (GPUs per node, nodes, memory per
GPU, optionally host RAM per node), it enumerates what the user can run with the shipped
templates: ZeRO stage 1/2/3 with or without optimizer offload (``zero1``, ``zero2``,
``zero2_offload``, ``zero3``, ``zero3_offload``), micro-batch and accumulation for the global
batch, activation checkpointing, method (ROSA, LoRA, full), the 8-bit optimizer and, for ROSA, a
quantized base. Each gets the accountant's per-rank peak over the run's phases
(``rosa_ds.memory.phases``: load, step, resample, checkpoint, export) on the device and on the
host, plus ``RUNTIME_RESERVE``; it fits if the device peak is within the budget and, with a host
budget, the node's ranks together fit in the host RAM.

Relative cost: a nominal step time (``Speeds``: compute at a sustained FLOP rate, communication
at the interconnect's bandwidth, offload over PCIe and a CPU Adam), divided by the best fitting
configuration's. Nominal, not measured: it ranks configurations (recompute costs ~1/3 of a
step's FLOPs for LoRA/ROSA, ZeRO-3 moves the weights every micro step, offload moves gradients
and runs Adam on the host), it does not predict wall time.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError, config_field
from ..utils.options import flag_name
from .counts import ModelCounts, arch_from_config, counts_from_module, load_config, meta_model
from .phases import phase_peaks
from .plan import ZERO3_AUTO, MemoryPlan

# (zero stage, optimizer offload) -> the shipped DeepSpeed template that runs it
TEMPLATES = {(1, False): "zero1", (2, False): "zero2", (2, True): "zero2_offload", (3, False): "zero3",
             (3, True): "zero3_offload"}
# the templates' ZeRO buffer sizes (rosa_ds/ds/templates/*.json; tests/unit/test_planner.py keeps
# them equal) as MemoryPlan fields
TEMPLATE_BUFFERS = {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                    "prefetch_bucket_size": 5_000_000, "param_persistence_threshold": 1000,
                    "max_live_parameters": 20_000_000, "overlap_comm": False}
# the templates' "auto" ZeRO-3 values as MemoryPlan fields (TEMPLATE_BUFFERS holds the CPU's)
ZERO3_FIELDS = {"stage3_prefetch_bucket_size": "prefetch_bucket_size", "overlap_comm": "overlap_comm",
                "stage3_param_persistence_threshold": "param_persistence_threshold",
                "stage3_max_live_parameters": "max_live_parameters"}


def template_buffers(accelerator: str, stage: int) -> dict:
    """The shipped ZeRO-``stage`` template's buffer sizes on ``accelerator`` as MemoryPlan fields."""
    if stage != 3:
        return dict(TEMPLATE_BUFFERS)
    tuned = ZERO3_AUTO["cpu" if accelerator == "cpu" else "cuda"]
    return {**TEMPLATE_BUFFERS, **{field: tuned[key] for key, field in ZERO3_FIELDS.items()}}
# bytes the runtime takes besides the accounted tensors: CUDA context, cuBLAS workspace, NCCL
# buffers and allocator slack on a GPU; the interpreter, torch, DeepSpeed, transformers, the
# tokenizer and data on the CPU (measured: docs/memory.md "Preflight")
RUNTIME_RESERVE = {"cuda": 2 << 30, "cpu": 5 << 28}


@dataclass(frozen=True)
class Speeds:
    """Nominal rates for the relative cost (an H100-class node by default)."""

    flops: float = 400e12  # sustained bf16 FLOP/s per GPU
    intra_node: float = 150e9  # bytes/s per GPU, NVLink-class
    inter_node: float = 25e9  # bytes/s per GPU, 200 Gb/s InfiniBand
    pcie: float = 25e9  # host <-> device bytes/s
    host_adam: float = 2e9  # parameters/s updated by DeepSpeed's CPU Adam
    per_layer_step: float = 2e-3  # seconds per layer and micro step that do not shrink with its size


CPU_SPEEDS = Speeds(flops=0.2e12, intra_node=5e9, inter_node=1e9, pcie=1e12, host_adam=2e9, per_layer_step=1e-3)


@dataclass(frozen=True)
class Cluster:
    """What the run has: ``device_budget`` bytes per rank (GPU memory; host RAM per rank on the
    CPU), ``gpus_per_node`` x ``nodes`` ranks, optionally ``host_budget`` bytes per node."""

    device_budget: int
    gpus_per_node: int = 1
    nodes: int = 1
    host_budget: Optional[int] = None
    accelerator: str = "cuda"

    def __post_init__(self) -> None:
        for name in ("device_budget", "gpus_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Candidate:
    """One configuration, what it needs per rank and how much it costs."""

    method: str
    zero_stage: int
    offload: bool
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    optimizer: str
    quantize_base: Optional[str]
    rank: int
    device_peak: int  # bytes per rank incl. RUNTIME_RESERVE on the device (on the CPU: all of it)
    host_peak: int  # bytes per rank in host RAM
    peak_phase: str
    seconds: float  # nominal step time
    cost: dict = field(default_factory=dict)  # seconds by part: compute, recompute, communication, offload

    @property
    def template(self) -> str:
        return TEMPLATES[(self.zero_stage, self.offload)]

    def settings(self, precision: Optional[str] = None) -> dict:
        """The training recipe's settings for this configuration, by field (``True``: a switch on)."""
        out = {"method": self.method, "deepspeed": self.template, "micro_batch": self.micro_batch,
               "grad_accum": self.grad_accum}
        if self.method != "full":
            out["rank"] = self.rank
        if self.checkpointing:
            out["gradient_checkpointing"] = True
        if self.optimizer == "adamw8bit":
            out["optim"] = "adamw8bit"
        if self.quantize_base:
            out["quantize_base"] = self.quantize_base
        if precision:
            out["precision"] = precision
        return out

    def flags(self, precision: Optional[str] = None) -> str:
        """The training command line for this configuration, which the planner's report prints:
        ``settings`` as the flags the recipe derives from field names (``flag_name``)."""
        settings = self.settings(precision)
        return " ".join(flag_name(k) if v is True else f"{flag_name(k)} {v}" for k, v in settings.items())

    def label(self) -> str:
        return (f"{self.method}{'+' + self.quantize_base if self.quantize_base else ''}, {self.template}, "
                f"micro {self.micro_batch} x accum {self.grad_accum}{', checkpointing' if self.checkpointing else ''}"
                f"{', adamw8bit' if self.optimizer == 'adamw8bit' else ''}")


@dataclass
class Planned:
    """The planner's answer: fitting candidates best first, and the closest misses per setup."""

    fits: list
    misses: list  # (Candidate, bytes over the device budget, bytes over the host budget)
    cluster: Cluster
    global_batch: int
    seq_len: int
    dtype: str


def rank_need(counts: ModelCounts, plan: MemoryPlan) -> tuple[str, int, int]:
    """(peak phase, bytes a rank needs on its device at that phase including ``RUNTIME_RESERVE``,
    its host peak over all phases). On the CPU device and host are one memory: the whole
    footprint counts as the device's and the host peak is 0."""
    peaks = phase_peaks(counts, plan)
    reserve = RUNTIME_RESERVE[plan.accelerator]
    if plan.accelerator == "cpu":
        phase = max(peaks, key=lambda p: peaks[p].total())
        return phase, peaks[phase].total() + reserve, 0
    phase = max(peaks, key=lambda p: peaks[p].device)
    return phase, peaks[phase].device + reserve, max(p.host for p in peaks.values())


def micro_batches(global_batch: int, world: int) -> list[int]:
    """Micro-batch sizes that divide the per-rank share of the global batch (powers of two and the
    share itself)."""
    if global_batch % world:
        raise ConfigError(f"{config_field('global_batch')} {global_batch} is not a multiple of the {world} ranks; "
                          f"give a multiple of {world}")
    share = global_batch // world
    return sorted({m for m in (1 << k for k in range(share.bit_length())) if share % m == 0} | {share})


def step_seconds(c: ModelCounts, plan: MemoryPlan, grad_accum: int, cluster: Cluster,
                 speeds: Speeds) -> dict:
    """Nominal seconds per optimizer step by part (see the module docstring)."""
    params = c.n_frozen + c.n_trainable + sum(m * n for m, n in c.adapted if c.quantized)
    tokens = plan.micro_batch * plan.seq_len * grad_accum
    arch = c.arch
    attention = 4 * arch.layers * plan.seq_len * arch.hidden  # QK^T and AV per token, forward
    forward = tokens * (2 * params + attention)
    weight_grads = tokens * 2 * c.n_trainable
    compute = (3 * forward if plan.method == "full" else 2 * forward + weight_grads) / speeds.flops \
        + grad_accum * arch.layers * speeds.per_layer_step  # small micro steps use the device worse
    recompute = forward / speeds.flops if plan.activation_checkpointing else 0.0
    n, w = plan.world_size, plan.weight_bytes
    bandwidth = speeds.inter_node if cluster.nodes > 1 else speeds.intra_node
    ring = (n - 1) / n if n > 1 else 0.0
    grads = c.n_trainable * w * (grad_accum if plan.zero_stage == 2 else 1)  # ZeRO-2 reduces every micro step
    moved = 2 * grads if plan.zero_stage < 3 else grads + c.n_trainable * w
    if plan.zero_stage == 3:  # weights gathered in forward and backward (and the recompute) each micro step
        frozen = 0 if c.quantized else c.n_frozen
        moved += (frozen + c.n_trainable) * w * grad_accum * (3 if plan.activation_checkpointing else 2)
    communication = moved * ring / bandwidth
    offload = 0.0
    if plan.offload_optimizer:
        share = c.n_trainable / n
        offload = 2 * share * 4 / speeds.pcie + share / speeds.host_adam
    return {"compute": compute, "recompute": recompute, "communication": communication, "offload": offload}


def _setups(methods, stages, accelerator: str, quantize: tuple):
    for method, (stage, offload), optimizer in itertools.product(methods, TEMPLATES, ("adamw", "adamw8bit")):
        if offload and (optimizer == "adamw8bit" or accelerator == "cpu"):
            continue  # bitsandbytes cannot be offloaded; on the CPU offload moves nothing
        if stage not in stages:
            continue
        for q in (None,) + (quantize if method == "rosa" else ()):
            yield method, stage, offload, optimizer, q


def plan_cluster(model, cluster: Cluster, *, global_batch: int, seq_len: int, dtype: str = "bf16", rank: int = 16,
                 methods=("rosa", "lora", "full"), stages=(1, 2, 3), quantize=("nf4",), targets=None,
                 speeds: Optional[Speeds] = None, attention_mask: bool = True) -> Planned:
    """Every configuration of ``model`` (a name or path ``load_config`` takes, or a transformers
    config) on ``cluster`` for ``global_batch`` sequences of ``seq_len`` tokens per step."""
    speeds = speeds or (CPU_SPEEDS if cluster.accelerator == "cpu" else Speeds())
    cfg = load_config(model) if isinstance(model, str) else model
    meta, arch = meta_model(cfg), arch_from_config(cfg)
    counts: dict = {}
    for method, q in {("full", None), ("lora", None), ("rosa", None)} | {("rosa", x) for x in quantize}:
        if method in methods:
            counts[method, q] = counts_from_module(meta, method, rank, targets, quantize_base=q)
            counts[method, q].arch = arch
    world, fits, misses = cluster.world, [], {}
    for method, stage, offload, optimizer, q in _setups(methods, stages, cluster.accelerator, quantize):
        for micro, ckpt in itertools.product(micro_batches(global_batch, world), (False, True)):
            accum = global_batch // (world * micro)
            plan = MemoryPlan(method=method, rank=rank, zero_stage=stage, world_size=world, dtype=dtype,
                              offload_optimizer=offload, optimizer=optimizer, micro_batch=micro, seq_len=seq_len,
                              activation_checkpointing=ckpt, accelerator=cluster.accelerator,
                              attention_mask=attention_mask, **template_buffers(cluster.accelerator, stage))
            c = counts[method, q]
            phase, device, host = rank_need(c, plan)
            cost = step_seconds(c, plan, accum, cluster, speeds)
            cand = Candidate(method, stage, offload, micro, accum, ckpt, optimizer, q, rank, device, host, phase,
                             sum(cost.values()), cost)
            over = (device - cluster.device_budget,
                    host * cluster.gpus_per_node - cluster.host_budget if cluster.host_budget else 0)
            if over[0] <= 0 and over[1] <= 0:
                fits.append(cand)
                continue
            key = (method, q, stage, offload, optimizer)
            if key not in misses or sum(max(o, 0) for o in over) < sum(max(o, 0) for o in misses[key][1:]):
                misses[key] = (cand, *over)
    fits.sort(key=rank_key(fits))
    fitting_setups = {(x.method, x.quantize_base, x.zero_stage, x.offload, x.optimizer) for x in fits}
    missed = sorted((v for k, v in misses.items() if k not in fitting_setups), key=lambda v: max(v[1], v[2]))
    return Planned(fits, missed, cluster, global_batch, seq_len, dtype)


def rank_key(fits: list):
    """Best first: configurations that train what was asked (no quantized base, Adam in fp32)
    before those that change the numerics; then nominal cost in 2 % steps; then the simpler setup
    (no offload, lower ZeRO stage, no recompute); then the smaller peak."""
    best = min((c.seconds for c in fits), default=1.0) or 1.0

    def key(c: Candidate):
        return (c.quantize_base is not None or c.optimizer != "adamw", round(c.seconds / best / 0.02), c.offload,
                c.zero_stage, c.checkpointing, c.device_peak)
    return key


def relative(planned: Planned) -> list[tuple[Candidate, float]]:
    best = planned.fits[0].seconds if planned.fits else 1.0
    return [(c, c.seconds / best) for c in planned.fits]


def best_for(planned: Planned, method: Optional[str] = None) -> Optional[Candidate]:
    """The best fitting configuration, of ``method`` if one of it fits."""
    same = [c for c in planned.fits if c.method == method]
    return (same or planned.fits or [None])[0]



def planned_markdown(planned: Planned, model: str, top: int = 15) -> str:
    """The planner's table (best first) and what does not fit, by how much."""
    from .report import fmt_bytes

    cl = planned.cluster
    where = "GPU" if cl.accelerator == "cuda" else "rank (host RAM, CPU)"
    lines = [f"# Plan: {model} on {cl.nodes} x {cl.gpus_per_node} {'GPUs' if cl.accelerator == 'cuda' else 'CPU ranks'}"
             f", {fmt_bytes(cl.device_budget)} per {where}"
             + (f", {fmt_bytes(cl.host_budget)} host RAM per node" if cl.host_budget else ""), "",
             f"Global batch {planned.global_batch} x {planned.seq_len} tokens, {planned.dtype}. Peaks per rank over "
             f"load, step, resample, checkpoint and export, including a runtime reserve of "
             f"{fmt_bytes(RUNTIME_RESERVE[cl.accelerator])}; relative cost = nominal step time / the best's "
             "(compute, recompute, communication, offload; see rosa_ds/memory/planner.py).", ""]
    if not planned.fits:
        lines += ["**Nothing fits.**", ""]
    else:
        lines += [f"{len(planned.fits)} configurations fit; the best {min(top, len(planned.fits))}:", "",
                  "| # | configuration | device peak (phase) | host peak | relative cost | recompute | comm. | "
                  "offload | flags |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for i, (c, rel) in enumerate(relative(planned)[:top], 1):
            share = {k: v / c.seconds for k, v in c.cost.items()} if c.seconds else {}
            lines.append(f"| {i} | {c.label()} | {fmt_bytes(c.device_peak)} ({c.peak_phase}) | "
                         f"{fmt_bytes(c.host_peak)} | {rel:.2f} | {100 * share.get('recompute', 0):.0f} % | "
                         f"{100 * share.get('communication', 0):.0f} % | {100 * share.get('offload', 0):.0f} % | "
                         f"`{c.flags()}` |")
        lines.append("")
    if planned.misses:
        lines += ["Setups where nothing fits (their closest configuration):", "",
                  "| setup | closest | device peak | over by | host over by |", "|---|---|---:|---:|---:|"]
        for c, dev, host in planned.misses:
            setup = (f"{c.method}{'+' + c.quantize_base if c.quantize_base else ''}, {c.template}"
                     f"{', adamw8bit' if c.optimizer == 'adamw8bit' else ''}")
            lines.append(f"| {setup} | micro {c.micro_batch}{', checkpointing' if c.checkpointing else ''} | "
                         f"{fmt_bytes(c.device_peak)} | {fmt_bytes(max(dev, 0))} | {fmt_bytes(max(host, 0))} |")
    return "\n".join(lines) + "\n"


def planned_json(planned: Planned) -> dict:
    from dataclasses import asdict

    return {"cluster": asdict(planned.cluster), "global_batch": planned.global_batch, "seq_len": planned.seq_len,
            "dtype": planned.dtype,
            "fits": [{**asdict(c), "template": c.template, "label": c.label(), "flags": c.flags(), "relative_cost": r}
                     for c, r in relative(planned)],
            "misses": [{**asdict(c), "template": c.template, "label": c.label(), "device_over": d, "host_over": h}
                       for c, d, h in planned.misses]}
