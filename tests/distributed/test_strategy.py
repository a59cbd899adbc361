"""RingStrategy: the (dp, sp) mesh, sampling over dp, batch sharding, sp=K == sp=1.

Cheap checks first (no process group), then spawned gloo runs of a user's own small
LightningModule under Lightning's Trainer, compared with a single-process sp=1 reference
over several optimizer steps, through a checkpoint resume.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Trainer

import _strategy_worker as W
from ring_lightning.sequence import sharding
from ring_lightning.parallel.strategy import DEFAULT_SEQUENCE_KEYS, MESH_AXES, RingStrategy

pytestmark = pytest.mark.distributed

# float32 end to end, a handful of SGD steps on a tiny model; observed differences ~1e-7.
PARITY_TOL = 1e-5
SPAWN_TIMEOUT_S = 150


def _strategy_at(global_rank: int, world_size: int, **kwargs) -> RingStrategy:
    env = LightningEnvironment()
    env.set_world_size(world_size)
    env.set_global_rank(global_rank)
    return RingStrategy(cluster_environment=env, **kwargs)


# ------------------------------------------------------------------ no process group


def test_ring_is_registered_and_trainer_accepts_the_name():
    trainer = Trainer(strategy="ring", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, RingStrategy)
    assert trainer.strategy.sequence_parallel_size == 1
    assert MESH_AXES == ("dp", "sp")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sequence_parallel_size=0), "sequence_parallel_size"),
        (dict(compression="gzip"), "compression"),
        (dict(compression_ratio=1.5), "compression_ratio"),
        (dict(powersgd_rank=0), "powersgd_rank"),
        (dict(layout="spiral"), "layout"),
        (dict(sequence_parallel_size=4, ulysses_size=3), r"strategy.ulysses_size=3 .*\[1, 2, 4\]"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RingStrategy(**kwargs)


def test_world_size_not_divisible_fails_before_process_group(monkeypatch):
    # LOCAL_RANK: an externally launched rank, so the Trainer launches nothing.
    monkeypatch.setenv("LOCAL_RANK", "0")
    trainer = Trainer(
        strategy=RingStrategy(sequence_parallel_size=3), accelerator="cpu", devices=2,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"sequence_parallel_size=3 does not divide the world size 2.*\[1, 2\]"):
        trainer.fit(W.TinyRingLM(), train_dataloaders=W._loaders(1)[0])
    assert not torch.distributed.is_initialized()


def test_sampler_runs_over_dp_only():
    # world 4 = dp 2 x sp 2; consecutive ranks form a sequence group.
    seen = [_strategy_at(r, 4, sequence_parallel_size=2).distributed_sampler_kwargs for r in range(4)]
    assert seen == [{"num_replicas": 2, "rank": d} for d in (0, 0, 1, 1)]
    s = _strategy_at(3, 4, sequence_parallel_size=2)
    assert (s.sp_rank, s.dp_rank, s.sp_size, s.dp_size) == (1, 1, 2, 2)


def _batch(seq_len: int = 16):
    ids = torch.arange(2 * seq_len).view(2, seq_len)
    return {"input_ids": ids, "labels": ids + 100, "loss_mask": ids % 2, "doc_id": torch.tensor([7, 8])}


@pytest.mark.parametrize("layout", sharding.LAYOUTS)
def test_shard_batch_shards_sequence_keys_and_adds_global_positions(layout):
    batch = _batch()
    for rank in range(2):
        out = _strategy_at(rank, 2, sequence_parallel_size=2, layout=layout).shard_batch(batch)
        for key in ("input_ids", "labels", "loss_mask"):
            torch.testing.assert_close(out[key], sharding.shard_sequence(batch[key], 2, rank, layout))
        expected_pos = sharding.sequence_positions(16, 2, rank, layout).expand(2, -1)
        torch.testing.assert_close(out["position_ids"], expected_pos)
        # Global positions index the unsharded sequence: they recover the tokens.
        torch.testing.assert_close(out["input_ids"], batch["input_ids"].gather(1, out["position_ids"]))
        assert out["doc_id"] is batch["doc_id"]  # not a sequence key: untouched
    assert "position_ids" in DEFAULT_SEQUENCE_KEYS


def test_shard_batch_keeps_given_positions_and_adds_them_with_sp1():
    batch = dict(_batch(), position_ids=torch.arange(16).flip(0).expand(2, -1))
    out = _strategy_at(1, 2, sequence_parallel_size=2, layout="zigzag").shard_batch(batch)
    torch.testing.assert_close(out["position_ids"], sharding.shard_sequence(batch["position_ids"], 2, 1, "zigzag"))
    out1 = _strategy_at(0, 1).shard_batch(_batch())
    torch.testing.assert_close(out1["position_ids"], torch.arange(16).expand(2, -1))
    torch.testing.assert_close(out1["input_ids"], _batch()["input_ids"])


def test_shard_batch_rejects_unsplittable_and_inconsistent_lengths():
    s = _strategy_at(0, 2, sequence_parallel_size=2, layout="zigzag")
    with pytest.raises(ValueError, match=r"sequence length 14 .*pad 2 more.*multiple of 4"):
        s.shard_batch(_batch(14))
    with pytest.raises(ValueError, match="disagree on the length"):
        s.shard_batch(dict(_batch(), labels=torch.zeros(2, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="shards dict batches"):  # unsharded would be silently wrong
        s.shard_batch([torch.zeros(2, 16)])


def test_reduce_token_loss_without_group_is_token_mean():
    loss_sum = torch.tensor(6.0, requires_grad=True)
    loss, mean = RingStrategy().reduce_token_loss(loss_sum, torch.tensor(4))
    assert loss.item() == pytest.approx(1.5) and mean.item() == pytest.approx(1.5)
    loss.backward()
    assert loss_sum.grad.item() == pytest.approx(0.25)
    loss0, mean0 = RingStrategy().reduce_token_loss(torch.tensor(0.0), 0)  # all labels ignored
    assert loss0.item() == 0.0 and mean0.item() == 0.0


# ------------------------------------------------------------------ spawned gloo runs


def _check_parity(results, reference, dp: int, sp: int) -> None:
    for rank, res in enumerate(results):
        d = rank // sp
        assert len(res["loss"]) == len(reference["loss"]) == 2 * W.STEPS_PER_EPOCH
        for step, (got, ref) in enumerate(zip(res["loss"], reference["loss"])):
            assert got == pytest.approx(ref[d], abs=PARITY_TOL), f"rank {rank} step {step} loss"
        for step, (got, ref) in enumerate(zip(res["grads"], reference["grads"])):
            assert got.keys() == ref.keys()
            for name in ref:
                torch.testing.assert_close(
                    got[name], ref[name], atol=PARITY_TOL, rtol=PARITY_TOL, msg=f"rank {rank} step {step} {name}"
                )
        for got, ref in zip(res["val_loss"], reference["val_loss"]):
            assert got == pytest.approx(ref[d], abs=PARITY_TOL)
        for got, ref in zip(res["val_synced"], reference["val_loss"]):
            assert got == pytest.approx(sum(ref) / dp, abs=PARITY_TOL)  # each group counted once


def _check_sampling(results, dp: int, sp: int):
    """Same samples within a sequence group, different across groups; returns ``samples[step][d]``.

    The first epoch must be exactly what the dp-only sampler gives. After the resume,
    Lightning 2.6 replays epoch 0's shuffle (it sets the sampler epoch from a progress
    counter restored before the epoch-end increment), so later epochs are only checked
    to partition the data across groups; the reference then trains on what was read.
    """
    num_samples = dp * W.BATCH * W.STEPS_PER_EPOCH
    samples = []
    for step in range(len(results[0]["samples"])):
        for rank, res in enumerate(results):
            assert res["samples"][step] == results[(rank // sp) * sp]["samples"][step], "same sample within a group"
        per_group = [results[d * sp]["samples"][step] for d in range(dp)]
        assert len({i for ids in per_group for i in ids}) == dp * W.BATCH  # different samples across groups
        if step < W.STEPS_PER_EPOCH:
            for d, ids in enumerate(per_group):
                order = W.sampler_order(dp, d, 0, num_samples)
                assert ids == order[step * W.BATCH:(step + 1) * W.BATCH]
        samples.append(per_group)
    for epoch in range(len(samples) // W.STEPS_PER_EPOCH):
        steps = samples[epoch * W.STEPS_PER_EPOCH:(epoch + 1) * W.STEPS_PER_EPOCH]
        assert sorted(i for step in steps for ids in step for i in ids) == list(range(num_samples))
    return samples


def test_ulysses_size_not_dividing_auto_sp_fails_before_process_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    trainer = Trainer(
        strategy=RingStrategy(ulysses_size=4), accelerator="cpu", devices=2,  # sp=auto: 2 per node
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"strategy.ulysses_size=4 must divide strategy.sequence_parallel_size=2"):
        trainer.fit(W.TinyRingLM(), train_dataloaders=W._loaders(1)[0])
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "world, sp, attention, compression",
    [
        pytest.param(2, 2, "core", "none", id="dp1-sp2-core"),
        pytest.param(4, 2, "multihead", "topk", id="dp2-sp2-multihead-lossless_topk"),
    ],
)
def test_sequence_parallel_matches_sp1_through_resume(run_distributed, tmp_path, world, sp, attention, compression):
    """Loss and every parameter gradient equal sp=1 over 4 steps with a checkpoint resume in the middle.

    ``topk`` at ratio 1.0 is lossless, so it also checks the hook is wired through the
    strategy without changing the numbers.
    """
    dp = world // sp
    results = run_distributed(
        W.fit_and_resume, world, sp, attention, str(tmp_path), compression, timeout=SPAWN_TIMEOUT_S
    )
    samples = _check_sampling(results, dp, sp)
    reference = W.reference_run(dp, attention, samples)
    _check_parity(results, reference, dp, sp)
    for rank, res in enumerate(results):
        info = res["info"]
        assert (info["dp_rank"], info["sp_rank"]) == divmod(rank, sp)
        assert (info["dp_size"], info["sp_size"]) == (dp, sp)
        assert info["mesh_shape"] == (dp, sp) and info["mesh_axes"] == MESH_AXES
        assert info["module_mesh_is_strategy_mesh"]
        assert info["sp_group_ranks"] == list(range((rank // sp) * sp, (rank // sp + 1) * sp))
        assert info["sampler"] == {"num_replicas": dp, "rank": rank // sp}
        assert info["layout"] == "zigzag"  # causal dense attention spanning ranks
        # Zigzag positions over 2 ranks: chunks r and 3 - r of 4.
        expected_pos = sharding.sequence_positions(W.SEQ, sp, rank % sp, "zigzag").tolist()
        assert all(p == expected_pos for p in res["positions"])
        expected_ratio = 2.0 if compression == "topk" else 1.0  # top-k at 1.0: values + int32 indices
        assert info["compression_ratio_0"] == info["compression_ratio_1"] == expected_ratio
    assert (tmp_path / "last.ckpt").exists()


def test_bad_configurations_fail_before_the_first_step(run_distributed, tmp_path):
    results = run_distributed(W.setup_errors, 2, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    for rank, res in enumerate(results):  # every rank fails the same way, none hangs
        for case in res.values():
            assert case["error"] is not None
            assert case["global_step"] == 0 and case["forwards"] == 0
        if rank == 0:  # said once: the other ranks exit quietly with status 2
            assert "contains no ring attention module" in res["no_ring_attention"]["error"]
            assert "sequence_parallel_size=2" in res["no_ring_attention"]["error"]
        else:
            assert res["no_ring_attention"]["error"] == "SystemExit(2)"
        # 15 tokens: dense causal attention cannot use zigzag (needs a multiple of 4), so
        # contiguous is chosen, which needs a multiple of 2.
        assert re.search(r"sequence length 15 .*pad 1 more", res["unsplittable_length"]["error"])
        assert "prefer different layouts ['contiguous', 'zigzag']" in res["modules_disagree_on_layout"]["error"]
        # known at the first forward (the strategy does not know the heads): before any step
        assert re.search(r"strategy.ulysses_size=2 must divide the number of attention heads \(3\).*\[1\]",
                         res["heads_not_divisible_by_ulysses_size"]["error"])


def test_lightning_launcher_runs_sequence_parallel_and_matches_sp1(tmp_path):
    """``Trainer(devices=2)`` launched by Lightning itself: it starts rank 1 and creates the
    gloo group; the strategy builds its mesh on top. Same numbers as sp=1."""
    script = Path(W.__file__).with_name("_strategy_launch_script.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)  # no external launch: Lightning must spawn rank 1 itself
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--devices", "2", "--sp", "2"],
        env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"run_rank{r}.pt") for r in range(2)]
    assert [(r["dp_rank"], r["sp_rank"]) for r in results] == [(0, 0), (0, 1)]
    assert all(r["mesh_shape"] == (1, 2) and r["backend"] == "gloo" for r in results)
    samples = [[res] for res in results[0]["samples"]]
    assert results[1]["samples"] == results[0]["samples"]
    reference = W.reference_run(1, "multihead", samples)
    for res in results:
        assert len(res["loss"]) == len(reference["loss"]) > 0
        assert len(res["grads"]) == len(reference["grads"]) > 0
        for got, ref in zip(res["loss"], reference["loss"]):
            assert got == pytest.approx(ref[0], abs=PARITY_TOL)
        for got, ref in zip(res["grads"], reference["grads"]):
            for name in ref:
                torch.testing.assert_close(got[name], ref[name], atol=PARITY_TOL, rtol=PARITY_TOL)


def test_dict_batch_without_sequence_keys_is_an_error_under_sp():
    """Whole sequences on every rank of a group under DDP's average would be silently wrong."""
    with pytest.raises(ValueError, match="none of the sequence keys"):
        _strategy_at(0, 2, sequence_parallel_size=2).shard_batch({"tokens": torch.zeros(2, 8)})
