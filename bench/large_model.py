"""A model two CPU ranks could not each load whole, fine-tuned under ZeRO-3 end to end.

    python -m bench.large_model                 # writes bench/results/large_model.{json,md}
    python -m bench.large_model --old-loading   # also: every rank loads the whole model (from_pretrained)
    python -m bench.large_model --layers 4 --solvers gram band   # writes bench/results/large_resample.{json,md}

A Llama-shaped model (hidden 2560, 30 layers, MLP 6912, vocab 32000: 2.54B parameters, 10.2 GB in
fp32) with random weights is saved once as bf16 safetensors under runs/large/model. Two CPU ranks
then run ``bench/large_rank.py``: partitioned load, ROSA (R = 8) applied partitioned with its
first factorization, 2 optimizer steps (fp32, 1 x 32 tokens), a resample, a checkpoint, a resume
(bit-exact next loss), and the streamed export in 1 GB shards, which this process reloads with
plain ``from_pretrained``. Each phase's peak RSS per rank is recorded beside the accountant's
prediction (``rosa_ds.memory.phases``). ``--old-loading`` measures what every rank loading the
whole model in fp32 (``from_pretrained``, the ZeRO-1/2 path) costs, or how it fails.

``--layers N --solvers A B``: the first N of the 30 layers (same shapes), the rank script run once per
solver on the same saved model; the first factorization and the resample, which scale with the
layer count, side by side, and scaled to 30 layers next to the whole model's committed phases.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.hardware import describe, one_line
from bench.report import save_results
from tests.helpers.launch import launch_ranks

ROOT = Path(__file__).resolve().parents[1]

SHAPE = {"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 30, "num_attention_heads": 20,
         "num_key_value_heads": 20, "vocab_size": 32000, "max_position_embeddings": 512, "tie_word_embeddings": False}
# --dry-run: the same script on a small shape, to check it end to end in a minute
DRY = {**SHAPE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "vocab_size": 1024}
GIB = 1 << 30


def make_model(path: Path, shape: dict) -> int:
    """Save the random-weight model once (bf16 safetensors); returns its parameter count."""
    import transformers as tf

    config = tf.LlamaConfig(**shape)
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="2GB")
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in tf.LlamaForCausalLM(config).parameters())


def reload_difference(export: Path, vocab: int, expected: list) -> float:
    """max |logit difference| between the export reloaded with plain from_pretrained (in a child
    process, so this one stays small) and the engine's logits on rank 0's probe batch."""
    code = ("import json, sys, torch, transformers as tf; "
            "m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
            "g = torch.Generator().manual_seed(0); "
            f"[torch.randint(0, {vocab}, (1, 32), generator=g) for _ in range(3)]; "
            f"x = torch.randint(0, {vocab}, (1, 32), generator=g); "
            "print(json.dumps(m(input_ids=x).logits[0, -1, :16].float().tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"reloading the export failed: {out.stderr[-2000:]}")
    logits = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    return float((logits - torch.tensor(expected)).abs().max())


def old_loading(path: Path) -> dict:
    """Two processes, each ``from_pretrained(path, dtype=float32)``: peak RSS, or how it ended."""
    code = ("import resource, sys, torch, transformers as tf; "
            "m = tf.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        out.append({"returncode": p.returncode, "peak_rss": int(stdout.strip().splitlines()[-1]) if p.returncode == 0
                    else None, "stderr_tail": stderr[-300:] if p.returncode else ""})
    return {"ranks": out}


def markdown(r: dict) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [f"# Large model under ZeRO-3 on 2 CPU ranks ({r['params'] / 1e9:.2f}B parameters, "
             f"{r['params'] * 4 / GIB:.1f} GiB in fp32)", "",
             f"Machine: {one_line(r['hardware'])}. Command: `python -m bench.large_model"
             f"{' --old-loading' if 'old_loading' in r else ''}`, {r['seconds'] / 60:.1f} min.", "",
             f"Process baseline RSS before loading (Python, torch, DeepSpeed): {gib(r['ranks'][0]['baseline_rss'])} / "
             f"{gib(r['ranks'][1]['baseline_rss'])} GiB. Peak RSS per phase (GiB), rank 0 / rank 1, and the "
             "accountant's predicted peak for that phase (device + host, which are one memory on the CPU) "
             "added to the baseline:", "",
             "| phase | seconds | peak RSS, rank 0 | peak RSS, rank 1 | predicted, rank 0 | predicted, rank 1 |",
             "|---|---:|---:|---:|---:|---:|"]
    key = {"initialize": "resample", "resume": "checkpoint"}
    for phase, v0 in r["ranks"][0]["phases"].items():
        v1 = r["ranks"][1]["phases"][phase]
        pred = [q["baseline_rss"] + q["predicted"][key.get(phase, phase)] for q in r["ranks"]]
        lines.append(f"| {phase} | {v0['seconds']} | {gib(v0['peak_rss'])} | {gib(v1['peak_rss'])} | {gib(pred[0])} | "
                     f"{gib(pred[1])} |")
    lines += ["", f"Losses of the 2 steps (rank 0): {r['ranks'][0]['losses']}; the step after the resume equals the "
              f"uninterrupted one bit for bit: {all(q['resumed_equal'] for q in r['ranks'])}. The export reloads with "
              f"`from_pretrained`: {r['reload']['ok']} (max |logit difference| {r['reload']['max_abs_diff']:.2e}, "
              f"{r['reload']['shards']} shards)."]
    if "old_loading" in r:
        lines += ["", "Every rank loading the whole model in fp32 (`from_pretrained`, as ZeRO-1/2 do): " + "; ".join(
            f"rank {i}: " + (f"peak RSS {gib(q['peak_rss'])} GiB" if q["returncode"] == 0 else
                             f"exit {q['returncode']} ({q['stderr_tail'].strip()[-120:] or 'killed'})")
            for i, q in enumerate(r["old_loading"]["ranks"]))]
    return "\n".join(lines) + "\n"


def solver_runs(work: Path, layers: int, solvers: list[str], dry: bool) -> dict:
    """The rank script once per solver on an N-layer model of the large shape (see the module docstring)."""
    shape = {**(DRY if dry else SHAPE), "num_hidden_layers": layers}
    model = work / f"layers{layers}" / "model"
    params = make_model(model, shape)
    runs = {}
    for solver in solvers:
        out = work / f"layers{layers}" / solver
        shutil.rmtree(out, ignore_errors=True)
        ranks = launch_ranks(ROOT / "bench" / "large_rank.py", ["--model-dir", str(model), "--out", str(out),
                             "--solver", solver], world_size=2, timeout=5400)
        runs[solver] = {"phases": [q["phases"] for q in ranks], "losses": ranks[0]["losses"],
                        "resumed_equal": all(q["resumed_equal"] for q in ranks)}
        shutil.rmtree(out, ignore_errors=True)
    whole = json.loads((ROOT / "bench" / "results" / "large_model.json").read_text())
    committed = {p: whole["ranks"][0]["phases"][p]["seconds"] for p in ("initialize", "resample")}
    return {"params": params, "layers": layers, "of_layers": SHAPE["num_hidden_layers"], "shape": shape,
            "hardware": describe(),
            "runs": runs, "committed_whole_model": committed}


def solver_markdown(r: dict) -> str:
    solvers, scale = list(r["runs"]), r["of_layers"] / r["layers"]
    secs = {s: {p: max(q[p]["seconds"] for q in r["runs"][s]["phases"]) for p in ("initialize", "resample", "step")}
            for s in solvers}
    lines = [f"# The first factorization and a resample by solver: {r['layers']} of the large model's "
             f"{r['of_layers']} layers ({r['params'] / 1e9:.2f}B parameters)", "",
             f"Machine: {one_line(r['hardware'])}. Command: `python -m bench.large_model --layers {r['layers']} "
             f"--solvers {' '.join(solvers)}`: ZeRO-3, 2 CPU ranks, fp32, R = 8, the same saved model (hidden "
             f"{r['shape']['hidden_size']}, MLP {r['shape']['intermediate_size']}, random bf16 weights) for each "
             "solver, run one after the other. Seconds are the slower rank's; 'scaled' multiplies by the "
             "layer ratio (both phases run once per adapted layer, split over "
             f"the ranks) for comparison with the whole model's committed run (bench/results/large_model.md).", "",
             "| phase | " + " | ".join(f"{s} s" for s in solvers) + " | " + " | ".join(f"{s} scaled to "
             f"{r['of_layers']} layers" for s in solvers) + " | whole model, committed |",
             "|---|" + "---:|" * (2 * len(solvers) + 1)]
    for p in ("initialize", "resample"):
        lines.append(f"| {p} | " + " | ".join(f"{secs[s][p]:.1f}" for s in solvers) + " | "
                     + " | ".join(f"{secs[s][p] * scale:.0f}" for s in solvers)
                     + f" | {r['committed_whole_model'][p]:.0f} |")
    lines += ["", "Two optimizer steps: " + ", ".join(f"{s} {secs[s]['step']:.1f} s" for s in solvers)
              + ". Losses of the 2 steps (rank 0): " + "; ".join(f"{s} {r['runs'][s]['losses']}" for s in solvers)
              + ". The step after a resume equals the uninterrupted one bit for bit: "
              + ", ".join(f"{s} {r['runs'][s]['resumed_equal']}" for s in solvers) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old-loading", action="store_true")
    ap.add_argument("--work", default=str(ROOT / "runs" / "large"))
    ap.add_argument("--dry-run", action="store_true", help="a small model, results in the work directory only")
    ap.add_argument("--layers", type=int, default=None, help="with --solvers: the first N layers only")
    ap.add_argument("--solvers", nargs="+", default=None, help="compare RosaConfig solvers (writes large_resample)")
    args = ap.parse_args()
    if args.solvers:
        work = Path(args.work) / ("dry" if args.dry_run else "full")
        r = solver_runs(work, args.layers or SHAPE["num_hidden_layers"], args.solvers, args.dry_run)
        save_results(work if args.dry_run else ROOT / "bench" / "results", "large_resample", r, solver_markdown(r))
        return
    shape = DRY if args.dry_run else SHAPE
    work, start = Path(args.work) / ("dry" if args.dry_run else "full"), time.perf_counter()
    params = make_model(work / "model", shape)
    for stale in ("ckpt", "export"):  # a previous run's frozen records would fill the disk
        shutil.rmtree(work / stale, ignore_errors=True)
    ranks = launch_ranks(ROOT / "bench" / "large_rank.py", ["--model-dir", str(work / "model"), "--out", str(work)],
                         world_size=2, timeout=5400)
    diff = reload_difference(work / "export", shape["vocab_size"], ranks[0]["probe_logits"])
    shards = len(list((work / "export").glob("model*.safetensors")))
    result = {"params": params, "hardware": describe(), "ranks": ranks,
              "reload": {"ok": diff < 1e-3, "max_abs_diff": diff, "shards": shards}}
    if args.old_loading:
        result["old_loading"] = old_loading(work / "model")
    result["seconds"] = time.perf_counter() - start
    save_results(work if args.dry_run else ROOT / "bench" / "results", "large_model", result, markdown(result))


if __name__ == "__main__":
    main()
