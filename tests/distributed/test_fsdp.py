"""RingFSDPStrategy (FSDP2 over the flattened (dp, sp) world) trains as DDP and as sp=1.

The user's own module (plain mean cross-entropy, ignored labels) and LongDocumentLM train
U.STEPS AdamW steps under RingFSDPStrategy; the same run under RingStrategy (DDP) and the
one-process sp=1 reference (``_user_module_worker.reference``) are the yardsticks.

Why not every parameter against sp=1: AdamW steps each element by about ``lr`` whatever the
size of its gradient, so an element whose exact gradient is zero (the user module's key bias:
adding a constant to every key of a row leaves softmax unchanged) or at the rounding level
(~1e-8, some of LongDocumentLM's weights at step 0) moves by up to ``lr`` in a direction set by
rounding. The user module's parameters are compared (with DDP at the same sp and with sp=1)
except the key bias; LongDocumentLM's parameters and gradients are compared with DDP at the same
sp, its losses and first gradients with sp=1.
"""

from __future__ import annotations

import pytest
import torch

import _fsdp_worker as F
import _strategy_worker as W
import _user_module_worker as U
from ring_lightning.models.activations import INTERLEAVED_IN_PLACE

pytestmark = pytest.mark.distributed
TOL = 1e-5  # float32 against sp=1, as test_user_module.py
SAME_SP_TOL = 1e-6  # FSDP against DDP at the same sp on 2 ranks: both add the same two shards
# On 4 ranks reduce-scatter and all-reduce add the 4 contributions in different orders: TOL (seen: 2e-6).
SPAWN_TIMEOUT_S = 240
KEY_BIAS = slice(W.EMBED, 2 * W.EMBED)  # qkv.bias rows of k: exact gradient 0


def _samples(results, sp: int):
    dp = len(results) // sp
    return [[results[d * sp]["samples"][step] for d in range(dp)] for step in range(U.STEPS)]


def _close(got, ref, tol, what):
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol, msg=lambda details: f"{what}: {details}")


def _same_sp_tol(world: int) -> float:
    return SAME_SP_TOL if world == 2 else TOL


def _without_key_bias(name, *params):
    """``params`` without the key bias's elements (module docstring: their exact gradient is 0)."""
    if name != "qkv.bias":
        return params
    keep = torch.ones_like(params[0], dtype=torch.bool)
    keep[KEY_BIAS] = False
    return tuple(p[keep] for p in params)


def _fit_both(run_distributed, tmp_path, world, sp, kind):
    return run_distributed(F.fit_fsdp_and_ddp, world, sp, kind, str(tmp_path), timeout=SPAWN_TIMEOUT_S)


def _check_sharded_state(results, ref_params):
    total = sum(p.numel() for p in ref_params.values())
    assert sum(r["fsdp"]["local_numel"] for r in results) == total, "each element held by exactly one rank"
    assert all(r["fsdp"]["local_numel"] < total for r in results)
    saved = results[0]["fsdp"]["checkpoint"]  # gathered: the whole parameters, one file
    assert results[0]["fsdp"]["checkpoint_step"] == U.STEPS and set(saved) == set(ref_params)
    for name, p in results[0]["fsdp"]["params"].items():
        assert torch.equal(saved[name], p), f"checkpoint's {name}"


@pytest.mark.parametrize("world, sp", [pytest.param(2, 2, id="sp2"), pytest.param(4, 2, id="dp2-sp2")])
def test_user_module_trains_as_ddp_and_as_sp1(run_distributed, tmp_path, world, sp):
    results = _fit_both(run_distributed, tmp_path, world, sp, "user")
    ref = U.reference(world // sp, "uneven", _samples([r["fsdp"] for r in results], sp), make_model=F.AdamWMeanLossLM)
    _check_sharded_state(results, ref["params"])
    for rank, res in enumerate(results):
        fsdp, ddp = res["fsdp"], res["ddp"]
        assert fsdp["samples"] == ddp["samples"]
        for step, grads in enumerate(fsdp["grads"]):
            for name, g in grads.items():
                _close(g, ref["grads"][step][name], TOL, f"rank {rank} step {step} gradient of {name} vs sp=1")
        for name, p in fsdp["params"].items():
            got, same_sp, want = _without_key_bias(name, p, ddp["params"][name], ref["params"][name])
            _close(got, same_sp, _same_sp_tol(world), f"rank {rank} {name} vs DDP")
            _close(got, want, TOL, f"rank {rank} {name} after {U.STEPS} AdamW steps vs sp=1")


@pytest.mark.parametrize("world, sp", [pytest.param(2, 2, id="sp2"), pytest.param(4, 2, id="dp2-sp2")])
def test_long_document_lm_trains_as_ddp_and_as_sp1(run_distributed, tmp_path, world, sp):
    results = _fit_both(run_distributed, tmp_path, world, sp, "model")
    ref = U.reference(world // sp, "uneven", _samples([r["fsdp"] for r in results], sp),
                      make_model=F.WholeGradDocumentLM)
    _check_sharded_state(results, ref["params"])
    for rank, res in enumerate(results):
        fsdp, ddp = res["fsdp"], res["ddp"]
        dp = world // sp  # the reference records each replica's loss in turn, step by step
        assert fsdp["loss"] == pytest.approx(ref["loss"][fsdp["dp_rank"]::dp], rel=TOL)
        for name, g in fsdp["grads"][0].items():
            _close(g, ref["grads"][0][name], TOL, f"rank {rank} first gradient of {name} vs sp=1")
        for step, grads in enumerate(fsdp["grads"]):
            for name, g in grads.items():
                _close(g, ddp["grads"][step][name], _same_sp_tol(world),
                       f"rank {rank} step {step} gradient of {name} vs DDP")
        for name, p in fsdp["params"].items():
            _close(p, ddp["params"][name], _same_sp_tol(world), f"rank {rank} {name} vs DDP")


@pytest.mark.parametrize("sharded", [pytest.param(False, id="gathered_file"), pytest.param(True, id="sharded_folder")])
def test_checkpoint_resumes_as_ddp(run_distributed, tmp_path, sharded):
    """2 steps, a checkpoint (one gathered file, or a folder of shards through
    torch.distributed.checkpoint), a fresh Trainer from another init resumed to step 4: the weights
    and AdamW moments go back into the shards, and training goes on as DDP's resume."""
    results = run_distributed(F.fit_and_resume, 2, 2, str(tmp_path), sharded, timeout=SPAWN_TIMEOUT_S)
    for rank, res in enumerate(results):
        fsdp, ddp = res["fsdp"], res["ddp"]
        assert fsdp["checkpoint_is_folder"] is sharded
        assert fsdp["step"] == ddp["step"] == 4 and fsdp["samples"] == ddp["samples"]
        for name, p in fsdp["params"].items():
            assert (p - fsdp["init"][name]).abs().max() > 0.1, f"{name}: the checkpoint was not loaded"
            _close(p, ddp["params"][name], SAME_SP_TOL, f"rank {rank} {name}: resumed under FSDP vs DDP")


def test_sharded_save_seen_incomplete_by_rank_0_raises_on_every_rank_and_publishes_nothing(run_distributed, tmp_path):
    """Rank 0 judges the staged folder after every rank wrote its shard and broadcasts the verdict: seen
    incomplete (node-local disks), every rank raises the same error naming the shared filesystem (no
    rank waits in a collective the others left), nothing is published, the staging folder is removed
    and the earlier last.ckpt (step 2) stays whole."""
    results = run_distributed(F.fit_and_fail_to_publish, 2, 2, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    assert results[0]["error"] == results[1]["error"]
    assert "is incomplete as rank 0 sees it" in results[0]["error"]
    assert "filesystem every node shares" in results[0]["error"]
    for res in results:
        assert res["entries"] == ["epoch=0-step=2.ckpt", "last.ckpt"], res["entries"]
        assert res["last_is_folder"] and res["last_step"] == 2 and res["last_readable"]


def test_a_publish_failing_on_rank_0_raises_on_every_rank_at_once(run_distributed, tmp_path):
    """Rank 0's rename of the complete staged folder fails (an OSError): rank 0 raises it, rank 1
    raises naming rank 0 (no rank waits in a barrier the other left), last.ckpt stays at step 2."""
    results = run_distributed(F.fit_and_fail_to_publish, 2, 2, str(tmp_path), "publish", timeout=SPAWN_TIMEOUT_S)
    assert results[0]["error"].startswith("OSError: cannot rename"), results[0]["error"]
    assert results[1]["error"].startswith("RuntimeError: ") and "rank 0 failed to publish" in results[1]["error"]
    for res in results:
        assert res["last_is_folder"] and res["last_step"] == 2 and res["last_readable"]


def test_a_rank_that_cannot_create_the_staging_folder_stops_every_rank_before_dcp(run_distributed, tmp_path):
    """Rank 1 alone cannot create the staging folder (a permission error): it raises its own error,
    rank 0 raises naming another rank, before either enters DCP's collectives (without the verdict
    rank 0 waits inside DCP until the timeout); last.ckpt stays at step 2, no staging folder."""
    results = run_distributed(F.fit_and_fail_to_publish, 2, 2, str(tmp_path), "mkdir", timeout=SPAWN_TIMEOUT_S)
    assert results[1]["error"].startswith("PermissionError: cannot create"), results[1]["error"]
    assert results[0]["error"].startswith("RuntimeError: ") and "another rank could not create" in results[0]["error"]
    for res in results:
        assert res["entries"] == ["epoch=0-step=2.ckpt", "last.ckpt"], res["entries"]
        assert res["last_is_folder"] and res["last_step"] == 2 and res["last_readable"]


@pytest.mark.parametrize("failure", ["no_room", "full_mid_write"])
def test_a_folder_save_without_room_names_the_space_on_every_rank_and_leaves_no_staged_folder(
        run_distributed, tmp_path, failure):
    """A disk without room for the folder of shards (seen on an H200: the 3b model's second 40 GiB
    folder beside the first, DCP failing with "unexpected pos" and the half-written staging folder
    left on a full disk). ``no_room``: rank 0's free space is below the shards' bytes, so every rank
    refuses before writing; ``full_mid_write``: the disk fills during DCP's write. Either way every
    rank raises the same CheckpointWriteError naming the size, the space and the overrides, the
    staging folder is gone and last.ckpt (step 2) stays whole."""
    results = run_distributed(F.fit_and_fail_to_publish, 2, 2, str(tmp_path), failure, timeout=SPAWN_TIMEOUT_S)
    assert results[0]["error"] == results[1]["error"]
    error = results[0]["error"]
    assert error.startswith("CheckpointWriteError: ") and "no space left to write checkpoint" in error, error
    assert "the folder of shards needs" in error and "callbacks.model_checkpoint.save_top_k" in error
    assert "0.0 MiB are free" in error, error
    for res in results:
        assert res["entries"] == ["epoch=0-step=2.ckpt", "last.ckpt"], res["entries"]
        assert res["last_is_folder"] and res["last_step"] == 2 and res["last_readable"]


def test_gradient_clipping_clips_by_the_whole_norm_as_ddp(run_distributed, tmp_path):
    """Lightning's ``gradient_clip_val`` over FSDP2's gradient shards (DTensors): the same norm
    and the same clipped training as DDP. The clip is below every step's norm, so it acts."""
    clip = 0.05
    for rank, res in enumerate(run_distributed(F.fit_clipped, 2, 2, clip, str(tmp_path), timeout=SPAWN_TIMEOUT_S)):
        fsdp, ddp = res["fsdp"], res["ddp"]
        assert min(ddp["grad_norms"]) > clip
        assert fsdp["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=SAME_SP_TOL)
        for name, p in fsdp["params"].items():
            got, same_sp = _without_key_bias(name, p, ddp["params"][name])
            _close(got, same_sp, SAME_SP_TOL, f"rank {rank} {name}: clipped under FSDP vs DDP")


def test_host_offload_and_bf16_policies(run_distributed, tmp_path):
    """``offload_params=True`` (FSDP2's CPUOffloadPolicy: shards, gradients and AdamW's moments on
    the host) trains LongDocumentLM to the same parameters as without it; ``mixed_precision="bf16"``
    computes with bf16 weights while the shards, their gradients and so AdamW stay float32.

    On CPU the policy itself moves nothing (the device is the host): what this checks is the
    strategy's offload path around it (no model_to_device, the optimizer built on the shards, the
    module's device). The device-vs-host comparison on a GPU is benchmarks/gpu_session.sh's part
    ``fsdp_offload_parity``."""
    results = run_distributed(F.fit_policies, 2, 2, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    for rank, res in enumerate(results):
        plain, offload = res["plain"], res["offload"]
        assert offload["samples"] == plain["samples"]
        for name, p in offload["params"].items():
            _close(p, plain["params"][name], SAME_SP_TOL, f"rank {rank} {name}: offloaded vs on the device")
        fp32, bf16 = res["fp32"], res["bf16"]
        assert fp32["compute_dtypes"] == {"torch.float32"} and bf16["compute_dtypes"] == {"torch.bfloat16"}
        assert bf16["master_dtypes"] == bf16["grad_dtypes"] == {"torch.float32"}
        assert bf16["losses"] != fp32["losses"]  # bf16 weights change the numbers...
        assert bf16["losses"] == pytest.approx(fp32["losses"], rel=2e-2)  # ...by bf16's rounding only


FULL = {"checkpointing": "full"}
OFFLOAD = {"checkpointing": "full", "offload_activations": True}
MEMORY_OPTIONS = {  # (ModelConfig fields, the module's loss_chunk_tokens); a shard holds 8 tokens
    "full": (FULL, None),
    "full-pairs-tiles": ({**FULL, "blocks_per_checkpoint": 2, "mlp_tile_tokens": 3}, None),
    "selective-chunked_loss": ({"checkpointing": "selective"}, 3),
    "tiles": ({"mlp_tile_tokens": 3}, None),
    "offload": (OFFLOAD, None),
    "offload-pairs-tiles": ({**OFFLOAD, "blocks_per_checkpoint": 2, "mlp_tile_tokens": 3}, 3),
}


@pytest.mark.parametrize("names", [pytest.param(["full", "full-pairs-tiles", "selective-chunked_loss", "tiles"],
                                                id="recompute"),
                                   pytest.param(["offload", "offload-pairs-tiles"], id="offload")])
def test_memory_options_train_as_ddp(run_distributed, names):
    """Activation checkpointing (full, k blocks per group, selective), MLP tiles, the chunked loss
    (the final norm inside it) and activation offload read the blocks' parameters in recomputations
    and in their own autograd Functions: under FSDP2 they must see them gathered and give their
    gradients back to the shards, training as DDP at the same sp (3 blocks: pairs leave a group of 1)."""
    results = run_distributed(F.fit_memory_options, 2, 2, [MEMORY_OPTIONS[n] for n in names],
                              timeout=SPAWN_TIMEOUT_S)
    for rank, runs in enumerate(results):
        for name, run in zip(names, runs):
            fsdp, ddp = run["fsdp"], run["ddp"]
            assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=SAME_SP_TOL), name
            assert len(fsdp["grads"]) == len(ddp["grads"]) == U.STEPS
            for step, grads in enumerate(fsdp["grads"]):
                for p, g in grads.items():
                    _close(g, ddp["grads"][step][p], SAME_SP_TOL, f"{name}: rank {rank} step {step} gradient of {p}")
            for p, value in fsdp["params"].items():
                _close(value, ddp["params"][p], SAME_SP_TOL, f"{name}: rank {rank} {p} vs DDP")


def test_non_finite_skip_agrees_across_gradient_shards(run_distributed, tmp_path):
    """A NaN in one rank's gradient shard: the guard reads the whole norm, so every rank skips that
    step (one rank skipping alone would step the shards apart) and training goes on finite."""
    results = run_distributed(F.fit_non_finite_skip, 2, 2, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    assert [r["skipped"] for r in results] == [1, 1]
    for name, p in results[0]["params"].items():
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, results[1]["params"][name]), name


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_offload_after_validation_trains_as_ddp(run_distributed, reshard_after_forward):
    """A validation forward (no backward) before a step: under reshard_after_forward=False it leaves
    the blocks gathered; activation offload's recomputation must still give every block its gradient
    (without the reshard at the step's start, step 0's blocks reached AdamW with none)."""
    results = run_distributed(F.fit_validated, 2, 2, OFFLOAD, reshard_after_forward, timeout=SPAWN_TIMEOUT_S)
    for rank, run in enumerate(results):
        fsdp, ddp = run["fsdp"], run["ddp"]
        assert fsdp["no_grad"] == [[]] * U.STEPS, fsdp["no_grad"]
        for step, grads in enumerate(fsdp["grads"]):
            for p, g in grads.items():
                _close(g, ddp["grads"][step][p], SAME_SP_TOL, f"rank {rank} step {step} gradient of {p}")


def test_two_forwards_before_one_backward_under_offload_are_refused_not_wrong(run_distributed):
    """A training step that runs the model twice with gradient (loss + 0.5 * loss again) under
    activation offload: FSDP2 takes a block's second recomputation within one backward for a replay
    whose gradients it has reduced already and drops them (seen: every block's gradient wrong at
    step 0, with reshard_after_forward true or false). It is refused on every rank, naming the
    options that train it; checkpointing=full trains it as DDP, and DDP trains it under offload too."""
    runs = [(OFFLOAD, False), (OFFLOAD, True), (FULL, False)]
    results = run_distributed(F.fit_two_forwards, 2, 2, runs, timeout=SPAWN_TIMEOUT_S)
    for rank, (offload_kept, offload_resharded, full) in enumerate(results):
        for run in (offload_kept, offload_resharded):
            error = run["fsdp"].get("error")
            assert error == INTERLEAVED_IN_PLACE, run["fsdp"]  # the refusal itself, on this rank
            assert "checkpointing=full" in error and "strategy=ring" in error  # and it names the overrides
        assert full["fsdp"]["no_grad"] == [[]] * U.STEPS
        for step in range(U.STEPS):
            for p, g in full["ddp"]["grads"][step].items():
                _close(full["fsdp"]["grads"][step][p], g, SAME_SP_TOL, f"full: rank {rank} step {step} gradient of {p}")
                _close(offload_kept["ddp"]["grads"][step][p], g, SAME_SP_TOL,
                       f"DDP offload vs full: rank {rank} step {step} gradient of {p}")


def test_a_folder_save_that_fails_on_rank_0_alone_raises_on_every_rank_without_waiting(run_distributed, tmp_path):
    """Rank 0 alone fails after every rank wrote its shard (its meta.pt write): the ranks agree on the
    write's verdict before anything else, so rank 1 raises at once naming another rank's failure
    instead of waiting in the next collective until the timeout; the staging folder is removed and
    last.ckpt (step 2) stays whole (without the shared verdict: rank 1 is left in a barrier rank 0
    never reaches, and fails only when rank 0's process ends or the timeout passes)."""
    results = run_distributed(F.fit_and_fail_to_publish, 2, 2, str(tmp_path), "meta_write", timeout=SPAWN_TIMEOUT_S)
    assert results[0]["error"] == "OSError: simulated failure writing meta.pt", results[0]["error"]
    assert results[1]["error"].startswith("RuntimeError: save_distributed_checkpoint=true: another rank failed "
                                          "to write its part"), results[1]["error"]
    for res in results:
        assert res["entries"] == ["epoch=0-step=2.ckpt", "last.ckpt"], res["entries"]
        assert res["last_is_folder"] and res["last_step"] == 2 and res["last_readable"]
