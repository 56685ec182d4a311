"""Progress in a log file is whole lines, each with the step's own fields."""
import logging

from rosa_ds.recipe.metrics import LineProgress, progress


def test_log_file_progress_is_whole_lines_with_the_steps_fields(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    bar = progress(40, enabled=True)  # pytest captures stderr: not a terminal
    assert isinstance(bar, LineProgress) and bar.every == 2
    with caplog.at_level(logging.INFO, logger="rosa_ds"):
        for step in range(1, 41):
            bar.update(1)
            bar.set_postfix(loss=f"{step:.3f}")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 and all("\r" not in line and "\n" not in line for line in lines)
    assert lines[0].startswith("train 2/40 (5%) loss=2.000") and lines[-1].startswith("train 40/40 (100%) loss=40.000")
