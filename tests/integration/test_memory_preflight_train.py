"""train.py refuses, before anything starts, a model.vocab_size below the tokenizer's and a run
whose memory estimate cannot fit (on CPU: the host), each once and naming the override."""

import pytest
from train_runner import run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
NOT_STARTED = ("Traceback", "Initializing distributed", "GLOBAL_RANK", "wandb: Tracking run", "Epoch 0")


@pytest.mark.parametrize("args, message", [
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the vocabulary of data.tokenizer=byte (259 ids): "
                               "set model.vocab_size >= 259"),
    # fp32 on 2 CPU processes: terabytes of activations per rank at 1M tokens, over any host
    (["model=350m", "data.seq_len=1048576"], "memory: this run needs host"),
])
def test_train_refuses_vocabulary_and_memory_before_starting_anything(tmp_path, data_cache, args, message):
    out = run_train([*args, "trainer=cpu", f"hydra.run.dir={tmp_path}"], data_cache, expect_failure=True,
                    env={"HYDRA_FULL_ERROR": "0"})
    assert out.count(message) == 1, out[-3000:]
    assert "this configuration cannot run; nothing was started" in out
    assert "preflight.check_memory=false" in out or "memory" not in message
    assert not [s for s in NOT_STARTED if s in out], out[-3000:]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "checkpoints").exists()
