"""Preflight on 2 CPU ranks with the default model: a run predicted not to fit ``--max-memory`` stops
before any weight loads, with one line naming a configuration that fits; that configuration, run,
stays within the budget (peak RSS of every rank, measured over the whole run). The cache starts
empty, so the suggested run (ZeRO-3: the process group exists before the model loads) also
converts the default GGUF, which must happen before the process group starts."""
import re

from rosa_ds.utils.sizes import parse_size
from tests.helpers.launch import launch_cli, metrics_records

BUDGET = "2.2GiB"  # below the default job's prediction (ZeRO-2: ~2.5 GiB per rank), above ZeRO-3's
SHORT = ["--max-steps", "1", "--epochs", "1", "--max-train-samples", "32", "--max-eval-samples", "2",
         "--num-samples", "0"]


def test_a_run_that_does_not_fit_is_refused_before_loading_and_the_suggestion_fits(tmp_path):
    refused = launch_cli(["--max-memory", BUDGET, *SHORT], tmp_path / "refused", check=False)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "rosa_ds: error:" in text, text[-3000:]
    error = text[text.index("rosa_ds: error:"):].split("\n")[0]
    assert "predicted to need" in error and f"{parse_size(BUDGET) / 2**30:.2f} GiB is available" in error, error
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # nothing ran: no weights, no engine
    assert "loaded " not in text  # models.load_model_and_tokenizer logs "loaded <model> ... in N s"
    flags = re.search(r"fix: run with (.*?) \(predicted", error).group(1).split()
    assert "--deepspeed" in flags

    out = tmp_path / "suggested"
    launch_cli([*flags, "--max-memory", BUDGET, *SHORT], out)
    memory = [r for r in metrics_records(out) if r.get("event") == "memory"][-1]
    assert memory["predicted_peak_bytes"] <= parse_size(BUDGET) == memory["available_bytes"]
    assert max(memory["peak_rss_bytes"]) <= parse_size(BUDGET), memory
