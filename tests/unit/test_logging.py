"""Library logging: nothing configured behind the application's back, rank 0 speaks."""
import subprocess
import sys

CODE = """
import logging, os, sys
os.environ["RANK"] = sys.argv[1]
from rosa_ds.utils.log import log_rank0, log_this_rank, setup_logging
log_rank0("before setup")
assert not logging.getLogger().handlers, "the library configured the root logger"
if sys.argv[2] == "setup":
    setup_logging(); setup_logging()
log_rank0("everyone says this"); log_this_rank("only I did this")
"""


def run(rank: int, setup: bool) -> str:
    out = subprocess.run([sys.executable, "-c", CODE, str(rank), "setup" if setup else "-"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_library_is_silent_until_an_entry_point_sets_up_logging():
    assert run(0, setup=False) == ""


def test_rank0_speaks_once_and_other_ranks_name_themselves():
    assert run(0, setup=True).splitlines() == ["[rosa_ds] everyone says this", "[rosa_ds] only I did this"]
    assert run(1, setup=True).splitlines() == ["[rosa_ds] (rank 1) only I did this"]


def test_the_recipe_silences_deepspeeds_accelerator_guess():
    """Importing the CLI imports DeepSpeed, which guesses its accelerator on every rank; the recipe
    says once which accelerator it uses instead (``cli.accelerator_name``)."""
    out = subprocess.run([sys.executable, "-c", "import rosa_ds.recipe.cli"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator" not in out.stderr, out.stderr
