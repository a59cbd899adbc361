"""The pre-flight check (ring_lightning/preflight/) and the one owner of length rules
(ring_lightning/sequence/lengths.py): bad inputs are refused from the composed config alone, with a
message naming the override and a value that works, and no process group exists yet."""

import re

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ring_lightning import preflight
from ring_lightning.attention import create_ring_attention
from ring_lightning.data import LongDocumentDataModule
from ring_lightning.sequence.lengths import LengthRules, check_length, length_multiple
from test_memory_estimate import one_h200  # noqa: F401 (a fixture: one simulated H200)
from test_configs import CONF, RECIPE_NAMES, TRAIN, compose_cfg as compose_recipe  # noqa: F401 (TRAIN: resolvers)


def compose_cfg(tmp_path, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", "trainer=cpu", *overrides])


def refused(cfg, match):
    with pytest.raises(preflight.ConfigError, match=match):
        preflight.check_config(cfg)
    assert not dist.is_initialized()  # nothing was started


# ---------------------------------------------------------------------- lengths.py
def test_padding_advice_is_the_lcm_of_every_rule_not_the_first_segment():
    # The case: segments [2048, 4096] at 5000 over 2 ranks; 6144 (a multiple of 2048) fails too.
    rules = LengthRules((2048, 4096), None, 2, "contiguous")
    with pytest.raises(ValueError, match=r"Set data\.seq_len=8192 .*every multiple of 8192"):
        check_length(5000, rules, "data.seq_len")
    assert rules.problems(6144) and not rules.problems(8192) and not rules.problems(4096)
    assert length_multiple([2048, 4096], 2, "contiguous") == 8192
    assert length_multiple(None, 2, "zigzag", block_size=64) == 64


def test_smallest_valid_length_matches_an_exhaustive_search_and_multiples_are_valid():
    for segs, rates, W, layout, block in [((4, 6), None, 2, "contiguous", None), ((8, 32), (1, 4), 4, "zigzag", None),
                                          ((16,), (2,), 3, "auto", 4), (None, None, 4, "zigzag", 8)]:
        rules = LengthRules(segs, rates, W, layout, block)
        for n in range(1, 150):
            assert rules.smallest_valid(n) == next(m for m in range(n, 10**5) if rules.valid_layouts(m))
        assert all(rules.valid_layouts(k * rules.multiple()) for k in range(1, 12))


def test_attention_call_reports_every_rule_in_one_message():
    attn = create_ring_attention("block_sparse", segment_lengths=[16, 32], block_size=16)
    with pytest.raises(ValueError, match=r"segment length 16 must divide it.*Use length 32"):
        attn(*[torch.zeros(1, 24, 2, 4)] * 3)


# ---------------------------------------------------------------------- preflight
def test_bad_sequence_length_names_data_seq_len_and_a_length_that_works(tmp_path):
    cfg = compose_cfg(tmp_path, "data.seq_len=5000", "variant.segment_lengths=[2048,4096]")
    refused(cfg, r"sequence length 5000 .*Set data\.seq_len=8192")


def test_bad_block_size_names_both_overrides(tmp_path):
    cfg = compose_cfg(tmp_path, "variant=block_sparse", "data.seq_len=1000")
    refused(cfg, r"block_size 64 must divide it\. Set data\.seq_len=1024.*or variant\.block_size=8")


def test_layout_and_ranks_count_in_the_length(tmp_path):
    # 2 ranks in zigzag: 4 pieces; 1026 splits over 2 ranks but not into 4
    cfg = compose_cfg(tmp_path, "strategy.layout=zigzag", "data.seq_len=1026")
    refused(cfg, r"'zigzag' layout over 2 ranks.*Set data\.seq_len=1028")
    preflight.check_config(compose_cfg(tmp_path, "strategy.layout=contiguous", "data.seq_len=1026"))


def test_devices_and_sequence_parallel_size(tmp_path):
    refused(compose_cfg(tmp_path, "strategy.sequence_parallel_size=3"),
            r"strategy\.sequence_parallel_size=3 does not divide the world size 2.*valid values for this world: \[1, 2\]")
    refused(compose_cfg(tmp_path, "trainer.devices=0"), r"trainer\.devices=0 is not valid")


def test_validation_interval_is_clamped_to_a_shortened_run(tmp_path):
    cfg = compose_cfg(tmp_path, "trainer.max_steps=20")  # val_check_interval 50 in conf/trainer
    notes = preflight.check_config(cfg)
    assert cfg.trainer.val_check_interval == 20 and "validating at step 20" in notes[0]
    assert preflight.check_config(compose_cfg(tmp_path)) == []


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_shortened_on_the_command_line_still_validates(tmp_path, recipe):
    cfg = compose_recipe(tmp_path, ["trainer.max_steps=7"], recipe=recipe)  # below every recipe's interval
    preflight.clamp_schedule(cfg)
    assert cfg.trainer.val_check_interval <= 7 and cfg.trainer.limit_val_batches != 0


def test_offline_hub_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(tmp_path, "data=hub", f"data.cache_dir={tmp_path}")
    datamodule = LongDocumentDataModule(**{k: v for k, v in OmegaConf.to_container(cfg.data).items()
                                           if k != "_target_"})
    with pytest.raises(ConnectionError, match=r"data=hub: cannot reach hub dataset data\.hub_name='emozilla/pg19'"
                                             r".*data=stdlib"):
        preflight.check_data_source(datamodule)
    assert not dist.is_initialized()


def test_user_errors_print_once_without_traceback_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_cfg(tmp_path, "data.batch_size=0")
    with pytest.raises(SystemExit) as exit_info, preflight.user_errors(cfg, "data"):
        LongDocumentDataModule(batch_size=0)
    assert exit_info.value.code == preflight.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("data.batch_size must be an integer >= 1, got 0") == 1 and "Traceback" not in err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the traceback on request
    with pytest.raises(ValueError), preflight.user_errors(cfg, "data"):
        LongDocumentDataModule(batch_size=0)


def test_files_without_paths_names_data_paths_instead_of_a_hydra_traceback(tmp_path, capsys, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_cfg(tmp_path, "data=files")
    with pytest.raises(SystemExit) as exit_info, preflight.user_errors(cfg, "data"):
        instantiate(cfg.data)  # what train.py does first
    assert exit_info.value.code == preflight.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert err.count("data.paths is required and not set") == 1 and "data.paths=['" in err
    assert "Traceback" not in err and "MissingMandatoryValue" not in err


def test_more_cpu_processes_than_cores_is_a_note_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.machine, "visible_gpus", lambda: 0)
    monkeypatch.setattr(preflight.machine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    notes = preflight.check_config(compose_cfg(tmp_path, "trainer.devices=4"))
    assert any("trainer.devices=4 starts 4 CPU processes on 2 core(s)" in n and "trainer.devices=2" in n
               for n in notes)
    assert not any("CPU processes" in n for n in preflight.check_config(compose_cfg(tmp_path, "trainer.devices=2")))


def test_data_module_checks_its_length_against_the_trainers_attention_at_setup():
    """Plain Lightning users (no train.py): the data module's setup refuses seq_len before any batch."""
    from types import SimpleNamespace

    from ring_lightning.training.module import LongDocumentLM

    lm = LongDocumentLM(model={"preset": "tiny"}, attention={"variant": "standard", "segment_lengths": [128, 512]})
    data = LongDocumentDataModule(source="retrieval", seq_len=500, batch_size=2)
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(sequence_parallel_size=2, layout="auto"),
                                   lightning_module=lm)
    with pytest.raises(ValueError, match=r"segment length 128 must divide it\. Set seq_len=512"):
        data.setup("fit")
    data.seq_len = 512
    data.setup("fit")


def test_hybrid_groups_are_checked_before_launch_with_the_ring_over_sp_over_u(tmp_path):
    """Under ulysses_size=U the segment rules hold over the ring's sp/U ranks (what the ring
    checks at its first step), not over sp; U must divide sp and the heads."""
    four = ["trainer.devices=4", "strategy.sequence_parallel_size=4"]
    # length 48, one segment of 48 at rate 8: over 4 ranks the rate does not divide the 12-token
    # piece, over the ring's 2 ranks (U=2) it divides the 24-token piece.
    seg = ["data.seq_len=48", "variant.segment_lengths=[48]", "variant.dilation_rates=[8]"]
    refused(compose_cfg(tmp_path, *four, *seg), "data.seq_len")
    preflight.check_config(compose_cfg(tmp_path, *four, *seg, "strategy.ulysses_size=2"))
    refused(compose_cfg(tmp_path, *four, "strategy.ulysses_size=3"),
            r"strategy\.ulysses_size=3 must divide strategy\.sequence_parallel_size=4.*valid values: \[1, 2, 4\]")
    refused(compose_cfg(tmp_path, *four, "strategy.ulysses_size=4", "model.n_heads=2", "model.dim=64"),
            r"strategy\.ulysses_size=4 must divide the model's heads \(model\.n_heads=2\).*valid values: \[1, 2\]")


RING_FSDP_3B = ["trainer=gpu", "trainer.devices=1", "model=3b", "model.vocab_size=128256", "data.seq_len=32768",
                "data.batch_size=1", "strategy=ring_fsdp"]


def _kept_activations_gib(note):
    return float(re.search(r"kept activations ([0-9.]+)", note).group(1))


def test_ring_fsdp_takes_every_checkpointing_option(tmp_path, one_h200):
    """Activation offload trains under FSDP2 as under DDP (tests/distributed/test_fsdp.py): the
    pre-flight lets it through, as full and selective checkpointing, and estimates each with the
    model state sharded (one simulated H200, the 3b model at 32K tokens); checkpointing=none over
    the GPU is refused naming the option that fits."""
    notes = {}
    for option in ("selective", "full", "offload"):
        cfg = compose_recipe(tmp_path, [*RING_FSDP_3B, f"checkpointing={option}"])
        [notes[option]] = preflight.check_config(cfg)  # one note: the memory estimate, no refusal
        assert cfg.strategy._target_.endswith("RingFSDPStrategy") and "model state (sharded)" in notes[option]
        assert ("offloaded inputs" in notes[option]) is (option == "offload"), notes[option]
    kept = [_kept_activations_gib(notes[option]) for option in ("selective", "full", "offload")]
    assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0], notes
    refused(compose_recipe(tmp_path, [*RING_FSDP_3B, "checkpointing=none"]),
            r"memory: .*model state \(sharded\).*It fits with checkpointing=full")


def test_ring_fsdp_refuses_gradient_compression_before_anything_starts(tmp_path, capsys, monkeypatch):
    """Gradient compression is a DDP communication hook (FSDP2 has none): refused as train.py's
    pre-flight builds the strategy, one message naming strategy.compression, exit 2."""
    from hydra.utils import instantiate

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_cfg(tmp_path, "strategy=ring_fsdp", "compression=topk")
    assert preflight.check_config(cfg) == []  # the config's shape is valid: the strategy's own check refuses
    with pytest.raises(SystemExit) as exit_info, preflight.user_errors(cfg, "strategy"):
        instantiate(cfg.strategy)
    assert exit_info.value.code == preflight.EXIT_CONFIG_ERROR and not dist.is_initialized()
    err = capsys.readouterr().err
    assert err.count("strategy.compression='topk' is not supported by RingFSDPStrategy") == 1, err
    assert "Use compression=none, or strategy=ring (DDP)" in err and "Traceback" not in err
