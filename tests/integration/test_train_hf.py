"""`python train.py model=hf model.name_or_path=<dir>` end to end: 2 CPU processes, sp=2, the model's
own tokenizer, a Lightning checkpoint, and the save_pretrained export that plain transformers loads
with the trained weights."""

import json
from pathlib import Path

import pytest
import torch
from train_runner import RUN_TIMEOUT_S, final_metrics, run_train

pytest.importorskip("transformers")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RUN_TIMEOUT_S + 60)]


def test_train_py_model_hf_trains_checkpoints_and_exports(tmp_path, data_cache):
    from hf_fixtures import pretrained_dir
    from transformers import AutoModelForCausalLM

    model_dir = pretrained_dir(tmp_path / "tiny_llama")
    run_dir = tmp_path / "run"
    out = run_train(["model=hf", f"model.name_or_path={model_dir}", "trainer.max_steps=3", "data.seq_len=256",
                     "data.batch_size=2", "logger=none", f"hydra.run.dir={run_dir}"], data_cache)
    assert final_metrics(out)["step"] == 3
    export = run_dir / "hf_model"
    assert "ring_lightning" not in (export / "config.json").read_text()  # plain transformers needs nothing of ours
    assert (export / "tokenizer.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(str(export))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    exported = plain.state_dict()
    for name, value in trained.items():  # the export holds the trained (last-step) weights
        assert torch.equal(exported[name], value), name
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(start[n], v) for n, v in trained.items())  # and training moved them
