"""train(cfg) in this process (ring_lightning/app/train.py): one-process checks without a subprocess.

The same function train.py's Hydra entry calls: a refused config and a one-device run, each in
a few seconds on one core.
"""

import importlib.util

import pytest
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from train_runner import ROOT, data_cache  # noqa: F401 (a fixture)

from ring_lightning import preflight
from ring_lightning.app.train import train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
_spec = importlib.util.spec_from_file_location("ring_train_entry", ROOT / "train.py")
_spec.loader.exec_module(importlib.util.module_from_spec(_spec))  # train.py registers the config's resolvers
ONE_CPU = ["trainer.accelerator=cpu", "trainer.devices=1", "logger=none", "data.max_tokens=20000",
           "data.batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
           "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2", "module.warmup_steps=1"]


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A run's process group lives until its process exits (Lightning destroys it at exit);
    the tests after these, in this process, start without one."""
    started = dist.is_initialized()
    yield
    if dist.is_initialized() and not started:
        dist.destroy_process_group()


def compose_cfg(tmp_path, overrides):
    """conf/config.yaml composed as train.py does, the run dir set (no Hydra run in progress)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_train_refuses_a_bad_config_in_process(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    cfg = compose_cfg(tmp_path, [*ONE_CPU, "data.seq_len=5000", "variant.segment_lengths=[2048,4096]",
                                 f"data.cache_dir={data_cache}"])
    with pytest.raises(SystemExit) as exit_info:
        train(cfg)
    assert exit_info.value.code == preflight.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("Set data.seq_len=8192") == 1 and "nothing was started" in err
    assert not (tmp_path / "checkpoints").exists() and not dist.is_initialized()


def test_train_runs_one_device_in_process(tmp_path, data_cache, capsys):
    cfg = compose_cfg(tmp_path, [*ONE_CPU, "data.seq_len=128", f"data.cache_dir={data_cache}"])
    metrics = train(cfg)
    assert metrics["step"] == 2 and 0 < metrics["train/loss"] < 10 and 0 < metrics["val/loss"] < 10, metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "metrics.jsonl").is_file()
    out = capsys.readouterr().out
    assert "== ring_lightning run finished ==" in out and f"hydra.run.dir={tmp_path} resume=true" in out
