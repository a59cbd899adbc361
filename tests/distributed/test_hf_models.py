"""Hugging Face models (Llama, Qwen2, Qwen3, Mistral; tiny random configs) trained by HFCausalLM
under RingStrategy equal transformers' own sdpa at sp=1: loss and every parameter gradient at each
step, float32, with packed documents and unevenly ignored labels; sp=2 on 2 processes, dp=2 x sp=2
and Ulysses 2 x ring 2 on 4. A model left on sdpa, and ring cores that are never called, are refused.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import _hf_worker as H  # noqa: E402

pytestmark = pytest.mark.distributed
PARITY_TOL = 1e-5  # float32, 2 AdamW steps of a tiny model; observed ~1e-7
SPAWN_TIMEOUT_S = 300


def _samples(per_rank, sp: int):
    """``samples[step][d]``: what sequence group d read at each step (identical inside a group)."""
    dp = len(per_rank) // sp
    for rank, res in enumerate(per_rank):
        assert res["samples"] == per_rank[(rank // sp) * sp]["samples"], "one sample per sequence group"
    return [[per_rank[d * sp]["samples"][step] for d in range(dp)] for step in range(H.STEPS)]


def _assert_matches_sdpa(per_rank, family: str, sp: int, what: str) -> None:
    ref = H.reference(family, len(per_rank) // sp, _samples(per_rank, sp))
    for rank, res in enumerate(per_rank):
        assert res["ring_calls"] > 0
        assert len(res["grads"]) == H.STEPS
        for step in range(H.STEPS):
            for name, g in ref["grads"][step].items():
                torch.testing.assert_close(res["grads"][step][name], g, atol=PARITY_TOL, rtol=PARITY_TOL,
                                           msg=f"{what}, rank {rank}: step {step} gradient of {name}")
    for step in range(H.STEPS):  # the logged train/loss: each sequence group's mean, on each of its ranks
        for rank, res in enumerate(per_rank):
            ref_loss = ref["loss"][step][rank // sp]
            got = res["loss"][step]
            assert got == pytest.approx(ref_loss, rel=PARITY_TOL, abs=PARITY_TOL), f"{what}: loss of step {step}"


def test_hf_families_at_sp2_equal_sdpa_and_local_attention_is_refused(run_distributed, tmp_path):
    results = run_distributed(H.fit_sp2, 2, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    for family in H.SP2_FAMILIES:
        runs = [r[family] for r in results]
        assert all(r["layout"] == "zigzag" for r in runs)
        _assert_matches_sdpa(runs, family, 2, f"{family} sp=2")
    _assert_matches_sdpa([r["llama_num_items"] for r in results], "llama", 2, "llama sp=2 num_items_in_batch")
    # Refused before the first step, once: rank 0 raises, rank 1 exits quietly.
    assert "attn_implementation='sdpa'" in results[0]["left_on_sdpa"]
    assert 'attn_implementation="ring_lightning"' in results[0]["left_on_sdpa"]
    assert results[1]["left_on_sdpa"] == "SystemExit(2)"
    for res in results:  # refused after the first step on every rank
        assert "called none of its 1 ring attention module" in res["cores_never_called"]


def test_hf_families_at_dp2_sp2_and_ulysses_x_ring_equal_sdpa(run_distributed, tmp_path):
    families = ["llama", "qwen3", "mistral"]
    results = run_distributed(H.fit_world4, 4, families, str(tmp_path), timeout=SPAWN_TIMEOUT_S)
    for family in families:
        _assert_matches_sdpa([r[family]["dp2_sp2"] for r in results], family, 2, f"{family} dp=2 x sp=2")
        _assert_matches_sdpa([r[family]["ulysses2_ring2"] for r in results], family, 4,
                             f"{family} sp=4 (ulysses 2 x ring 2)")


def test_hf_model_under_fsdp_exports_whole_weights_that_from_pretrained_reads(run_distributed, tmp_path):
    """RingFSDPStrategy shards the parameters (DTensors): the end-of-fit export gathers them on
    every rank and rank 0 saves them; plain transformers reads back the trained weights exactly."""
    from transformers import AutoModelForCausalLM

    export_dir = tmp_path / "export"
    results = run_distributed(H.fit_fsdp_and_export, 2, str(export_dir), str(tmp_path / "ckpt"),
                              timeout=SPAWN_TIMEOUT_S)
    trained = results[0]["params"]
    assert all(r["local_numel"] < sum(p.numel() for p in trained.values()) for r in results), "sharded"
    loaded = dict(AutoModelForCausalLM.from_pretrained(str(export_dir)).named_parameters())
    assert set(loaded) == set(trained)
    for name, p in trained.items():
        assert torch.equal(loaded[name].detach(), p), name
        assert torch.equal(results[1]["params"][name], p)
