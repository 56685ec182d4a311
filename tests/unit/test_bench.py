"""The benchmark tooling on synthetic run outputs: what it reads, how it checks targets; the package's
shape (``python -m bench.<name>``: no sys.path edits, no import cycle) and the commit every results file records."""
import ast
import graphlib
import importlib
import json
import subprocess
from pathlib import Path

import pytest

from bench.collect import collect
from bench.hardware import code_commit
from bench.report import save_results, targets, write
from bench.suites import SUITES

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
# scripts that write their launcher's per-rank or per-run scratch JSON (``--result`` / ``--out``), which the
# launcher folds into a results file of its own
SCRATCH_WRITERS = {"resample_rank", "large_rank", "gpu_engine_rank", "study_eval", "capacity_eval"}


def _write_run(out: Path, step_s: float, resample_s: float, losses: list[float], trainable: int) -> None:
    out.mkdir(parents=True)
    recs = [{"event": "eval", "step": 0, "epoch": 0, "eval_loss": losses[0]}]
    step = 0
    for epoch in range(2):
        for k in range(4):
            step += 1
            # each epoch's first step is slow (loader start): the median must leave it out
            recs.append({"step": step, "epoch": epoch, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 100.0,
                         "step_seconds": step_s * (5 if k == 0 else 1)})
        if epoch == 0 and resample_s:
            recs.append({"event": "resample", "index": 1, "step": step, "seconds": resample_s})
        recs.append({"event": "eval", "step": step, "epoch": epoch + 1, "eval_loss": losses[epoch + 1]})
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    zeros = {"frozen_weights": 0}
    (out / "memory_report.json").write_text(json.dumps({
        "predicted": {"device": {**zeros, "trainable_weights": 100}, "host": {}},
        "measured_all_ranks": [{"device": {**zeros, "trainable_weights": 100}, "host": {}}] * 2,
        "comparison": [{"rel_error": 0.0}], "n_trainable": trainable, "n_frozen": 10, "rho": 4.0}))


def test_collect_reads_steps_evals_resamples_and_memory(tmp_path):
    _write_run(tmp_path / "r", step_s=2.0, resample_s=1.0, losses=[5.0, 4.0, 3.5], trainable=1000)
    rec = collect(tmp_path / "r")
    assert rec["steps"] == 8 and rec["step_seconds_median"] == 2.0  # slow first steps left out
    assert rec["epoch_train_seconds"] == [16.0, 16.0]
    assert rec["resample_share_of_epoch"] == pytest.approx(1.0 / 16.0)
    assert (rec["eval_loss_start"], rec["eval_loss_final"], rec["eval_loss_best"]) == (5.0, 3.5, 3.5)
    assert rec["memory"]["predicted_bytes_rank0"] == 100 and rec["memory"]["measured_bytes_per_rank"] == [100, 100]
    assert rec["memory"]["trainable"] == 1000


def _suite_json(tmp_path, rosa_step: float, rosa_loss: float, resample_s: float = 0.1) -> Path:
    runs = []
    for name, method, step_s, loss in (("full", "full", 4.0, 3.0), ("lora-r8", "lora", 2.0, 3.4),
                                       ("rosa-r8", "rosa", rosa_step, rosa_loss)):
        _write_run(tmp_path / name, step_s, resample_s if method == "rosa" else 0.0, [5.0, 4.0, loss], 1000)
        runs.append({"name": name, "method": method, "rank": 8 if method != "full" else 0, "flags": [],
                     "group": "main", "wall_seconds": 60.0, "returncode": 0, **collect(tmp_path / name)})
    data = {"suite": "quick", "description": "synthetic", "task": "causal_lm", "flags": [], "deepspeed": "z.json",
            "nproc": 2, "started": "now", "runs": runs,
            "hardware": {"cpu": "cpu", "cpu_cores": 2, "memory_gib": 1, "gpu": None, "gpus": 0, "torch": "t",
                         "deepspeed": "d", "transformers": "x", "peft": "p"}}
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(data))
    return path


def test_targets_report_met_and_not_met_honestly(tmp_path):
    good = "\n".join(targets(json.loads(_suite_json(tmp_path / "a", 2.05, 3.3).read_text()), None))
    assert "ROSA step ≤ 1.05× LoRA, r=8 | 2.05 s vs 2.00 s = 1.025× | met" in good
    assert "ROSA eval loss < LoRA, r=8 | ROSA 3.3000 vs LoRA 3.4000 (Δ -0.1000) | met" in good
    assert ("resampling ≤ 1% of an epoch, rosa-r8 | 0.1 s = 0.6% of the 16 s, 4-step epoch it closes; "
            "≤ 1% needs epochs of ≥ 5 steps at 2.05 s/step | met") in good
    bad = "\n".join(targets(json.loads(_suite_json(tmp_path / "b", 2.5, 3.5, 1.0).read_text()), None))
    assert "= 1.250× | **NOT met**" in bad
    assert "(Δ +0.1000) | **NOT met**" in bad
    assert ("rosa-r8 | 1.0 s = 5.0% of the 20 s, 4-step epoch it closes; ≤ 1% needs epochs of ≥ 40 steps "
            "at 2.50 s/step | **NOT met**") in bad


def test_report_writes_markdown_and_plots(tmp_path):
    md = write(_suite_json(tmp_path, 2.0, 3.3))
    text = md.read_text()
    assert "| rosa-r8 | 1,000 |" in text and "Hardware: cpu, 2 cores" in text
    assert (tmp_path / "quick_curves.png").stat().st_size > 0 and (tmp_path / "quick_params.png").stat().st_size > 0


def test_suites_compare_equal_settings():
    quick = SUITES["quick"]
    names = [r.name for r in quick.runs]
    assert len(names) == len(set(names))
    for r in quick.runs:  # a run never overrides the shared data/steps/seed flags
        assert not {"--epochs", "--max-train-samples", "--seed", "--seq-len", "--micro-batch"} & set(r.flags)


def test_resample_share_is_against_the_epoch_it_closes(tmp_path):
    """A run stopped by --max-steps a few steps into epoch 2: the short last epoch must not count."""
    out = tmp_path / "r"
    out.mkdir()
    recs = [{"step": s, "epoch": 0 if s <= 10 else 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 1.0,
             "step_seconds": 1.0} for s in range(1, 13)]
    recs.insert(10, {"event": "resample", "index": 1, "step": 10, "epoch": 0, "seconds": 0.5})
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    rec = collect(out)
    assert rec["epoch_train_seconds"] == [10.0, 2.0] and rec["epoch_steps"] == [10, 2]
    assert rec["resample_share_of_epoch"] == pytest.approx(0.05)  # 0.5 s of the 10 s epoch, not of the mean 6 s


# ---------------------------------------------------------------- the package

def _bench_imports(name: str) -> list[tuple[str, bool]]:
    """(bench module imported, whether the import is at module level) for every import in bench/<name>.py."""
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets_ = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets_ = [f"{node.module}.{a.name}" if node.module == "bench" else node.module for a in node.names]
        else:
            continue
        out += [(t.split(".")[1], id(node) in top) for t in targets_ if t.startswith("bench.")]
    return out


def test_bench_imports_form_no_cycle_and_none_hides_in_a_function():
    graph = {name: {dep for dep, _ in _bench_imports(name)} for name in MODULES}
    assert graph["run"] >= {"study", "train_run"} and graph["study_report"] >= {"study_plan"}  # the graph is read
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    hidden = {name: dep for name in MODULES for dep, top in _bench_imports(name) if not top}
    assert not hidden, f"bench imports inside functions (they hide cycles): {hidden}"


def test_bench_edits_no_sys_path_and_every_module_imports_as_a_package():
    for name in MODULES:
        src = (BENCH / f"{name}.py").read_text()
        edits = [n.lineno for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Attribute) and n.attr == "path"
                 and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not edits and "noqa: E402" not in src, f"bench/{name}.py touches sys.path (lines {edits})"
        importlib.import_module(f"bench.{name}")


def test_every_results_writer_records_machine_and_commit():
    """A module that writes JSON builds a describe() record (machine + commit) or is a scratch writer;
    save_results, the shared writer, refuses a record without one."""
    for name in set(MODULES) - SCRATCH_WRITERS - {"report"}:
        src = (BENCH / f"{name}.py").read_text()
        if "json.dump" in src:
            assert "describe()" in src, f"bench/{name}.py writes JSON without a bench.hardware.describe() record"
    with pytest.raises(ValueError, match="describe"):
        save_results(Path("unused"), "x", {"hardware": {"cpu": "c"}}, "")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_code_commit_is_head_and_marks_changed_tracked_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    (tmp_path / "new.json").write_text("{}")  # an untracked file (a results file being written) is not a change
    assert code_commit(tmp_path) == head and len(head) == 40
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == head + "+dirty"
    assert code_commit(tmp_path / "not-a-repo") == "unknown"
