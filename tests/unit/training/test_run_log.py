"""What a run prints lands in its run directory (run_log.py), without third-party noise (console.py)."""

import logging
import sys

from ring_lightning.training import run_log
from ring_lightning.training.console import is_noise, quiet_third_party


def test_output_is_copied_to_the_ranks_file_without_redraws_or_noise(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test, tee and all
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    monkeypatch.setattr(run_log, "_current", {"path": None, "file": None})
    assert run_log.log_path(str(tmp_path), "train_ddp_process_1", 0) == str(tmp_path / "train.log")
    assert run_log.log_path(str(tmp_path), "train", 3) == str(tmp_path / "train_ddp_process_3.log")
    run_log.start(str(tmp_path / "train.log"), 0)
    print("step 10/100  train/loss 3.2")
    sys.stderr.write("\r 40%|####      | 4/10\r")  # a tqdm redraw: console only
    sys.stderr.write("wandb: WARNING `wandb.require('service')` is a no-op as it is now the default behavior.\n")
    sys.stderr.write("UserWarning: something the user can act on\n")
    run_log.start(str(tmp_path / "train_ddp_process_1.log"), 1)  # the next file (a rank's own)
    print("rank 1 line")
    sys.stdout.file = sys.stderr.file = None
    first = (tmp_path / "train.log").read_text().splitlines()
    assert first[0].startswith("== ring_lightning rank 0 (pid ")
    assert first[1:] == ["step 10/100  train/loss 3.2", "UserWarning: something the user can act on"]
    assert (tmp_path / "train_ddp_process_1.log").read_text().splitlines()[1:] == ["rank 1 line"]


def test_lightning_advice_and_wandb_header_are_noise_user_lines_are_not(caplog):
    from lightning.fabric.utilities.rank_zero import rank_zero_info

    quiet_third_party()
    with caplog.at_level(logging.INFO):
        rank_zero_info("You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them, "
                       "you should set `torch.set_float32_matmul_precision('medium' | 'high')`")
        rank_zero_info("a line for the user")
    assert [r.getMessage() for r in caplog.records] == ["a line for the user"]
    assert is_noise("wandb: W&B syncing is set to `offline` in this directory.")
    assert not is_noise("step 3/4  train/loss 5.2")
