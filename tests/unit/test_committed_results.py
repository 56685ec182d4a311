"""Results the README links to are the committed output of the command that regenerates them.

The command is read from the Makefile (its one owner) and rerun into a temporary folder; the
Markdown must equal the committed file (the PNG is drawn by matplotlib, whose bytes vary by
version, so only its presence is checked)."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_recipe(target: str) -> list[str]:
    """The argument list of a Makefile target's ``$(BIN)/python -m ...`` recipe (continuations joined)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = re.search(rf"^{re.escape(target)}:.*\n\t(.+)$", text, re.M).group(1)
    args = shlex.split(recipe)
    return args[args.index("-m"):]


def test_memory_report_is_the_committed_output(tmp_path):
    args = make_recipe("memory-report")
    outputs = {}
    for flag in ("--markdown", "--png"):
        i = args.index(flag)
        outputs[flag] = ROOT / args[i + 1]
        args[i + 1] = str(tmp_path / Path(args[i + 1]).name)
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    fresh = (tmp_path / outputs["--markdown"].name).read_text()
    assert fresh == outputs["--markdown"].read_text(), \
        f"{outputs['--markdown']} is stale: run `make memory-report` and commit the result"
    assert outputs["--png"].is_file()
