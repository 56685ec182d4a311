"""Every ds_configs/*.json, filled by build_ds_config, initializes DeepSpeed on 2 CPU ranks and
trains a tiny GPT-2 exactly like torch AdamW on the global batch (one launch for all five)."""
import pytest

from rosa_ds.ds.config import TEMPLATE_NAMES
from tests.helpers.launch import launch_ranks

SCRIPT = __file__.rsplit("/", 1)[0] + "/scripts/ds_templates_rank.py"


@pytest.fixture(scope="module")
def results():
    return launch_ranks(SCRIPT, ["--templates", *TEMPLATE_NAMES], world_size=2, timeout=600)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_trains_like_reference(results, name):
    r0, r1 = results[0][name], results[1][name]
    assert r0["stage"] == int(name[4]) and r0["offload"] == name.endswith("offload")
    assert r0["batch"] == [2, 1, 4]  # micro 2 x accum 1 x 2 ranks
    assert r0["optimizer"] == ("DeepSpeedCPUAdam" if r0["offload"] else "AdamW")
    assert r0["lrs"] == pytest.approx(r0["expected_lrs"], abs=1e-12)  # filled schedule reached DeepSpeed
    assert r0["moved"] > 1e-3  # the reference really trained, so agreement below means something
    assert r0["rel_err"] < 1e-5 and r1["rel_err"] < 1e-5
