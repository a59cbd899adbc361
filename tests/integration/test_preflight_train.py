"""train.py refuses a bad config as a user sees it: one message naming the override, exit
status 2, no traceback, and nothing started (no process group, no second rank, no wandb run)."""

import pytest
from train_runner import run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
NOT_STARTED = ("Traceback", "Initializing distributed", "GLOBAL_RANK", "wandb: Tracking run", "Epoch 0")


@pytest.mark.parametrize("args, env, message", [
    (["data.seq_len=5000", "variant.segment_lengths=[2048,4096]"], {}, "Set data.seq_len=8192"),
    (["data=hub"], {"HF_HUB_OFFLINE": "1"}, "data=hub: cannot reach hub dataset data.hub_name='emozilla/pg19'"),
    (["data=files", "data.paths=[conf/data/files.yaml]"], {}, "data.paths: the corpus is too short: "),
    (["data=files"], {}, "data.paths is required and not set"),  # not Hydra's MissingMandatoryValue traceback
])
def test_train_refuses_a_bad_config_before_starting_anything(tmp_path, data_cache, args, env, message):
    out = run_train([*args, f"hydra.run.dir={tmp_path}"], data_cache, expect_failure=True,
                    env={"HYDRA_FULL_ERROR": "0", **env})
    assert out.count(message) == 1, out[-3000:]
    assert "this configuration cannot run; nothing was started" in out
    assert not [s for s in NOT_STARTED if s in out], out[-3000:]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()
    assert message in (tmp_path / "train.log").read_text()  # the run's own log says it too
