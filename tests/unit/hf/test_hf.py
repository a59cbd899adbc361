"""ring_lightning.hf on one process: the registered attention equals transformers' sdpa, what it
cannot honour is refused by name, and HFCausalLM's export loads in plain transformers."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

import lightning.pytorch as pl  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from ring_lightning.hf import IMPLEMENTATION, HFCausalLM  # noqa: E402
from ring_lightning.hf.attention import ring_attention_forward  # noqa: E402

TOL = 1e-5  # float32 on CPU; observed <= 1e-7
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


FIELDS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def tiny(family: str, **overrides):
    return AutoConfig.for_model(family, **{**FIELDS, **overrides})


def _logits_and_grads(model, ids, **kwargs):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_implementation_equals_sdpa_at_sp1(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(family), attn_implementation=IMPLEMENTATION)
    assert model.config._attn_implementation == IMPLEMENTATION
    ids = torch.randint(0, 64, (2, 24))
    restart = torch.cat([torch.arange(9), torch.arange(15)]).expand(2, -1)  # two packed documents
    documents = (torch.arange(24) >= 9).long().expand(2, -1)
    for kwargs in ({}, {"position_ids": restart}, {"position_ids": restart, "document_ids": documents}):
        model.set_attn_implementation("sdpa")
        ref_logits, ref_grads = _logits_and_grads(model, ids, **{k: v for k, v in kwargs.items() if k != "document_ids"})
        model.set_attn_implementation(IMPLEMENTATION)
        logits, grads = _logits_and_grads(model, ids, **kwargs)
        torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=TOL)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=TOL, rtol=TOL, msg=f"{family} {list(kwargs)}: {name}")
    assert sum(m.ring_attention.profiler.calls > 0 for m in model.modules() if hasattr(m, "ring_attention")) == 2


def test_bf16_autocast_as_the_trainer_runs_it_matches_sdpa():
    """Under bf16-mixed the rotary embeddings leave q/k in float32 and v in bf16 (seen on an
    H200 with transformers 5.17): the implementation casts them as sdpa does under autocast."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny("llama"), attn_implementation=IMPLEMENTATION)
    ids = torch.randint(0, 64, (2, 24))
    outs = {}
    for impl in ("sdpa", IMPLEMENTATION):
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[impl] = model(input_ids=ids, use_cache=False).logits.float()
    err = (outs[IMPLEMENTATION] - outs["sdpa"]).norm() / outs["sdpa"].norm()
    assert err < 2e-2, float(err)  # bf16 operands both ways


def test_what_the_ring_cannot_honour_is_refused_by_name():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 16))
    model = AutoModelForCausalLM.from_config(tiny("llama"), attn_implementation=IMPLEMENTATION)
    pad = torch.ones(2, 16, dtype=torch.long)
    model(input_ids=ids, attention_mask=pad, use_cache=False)  # a mask without padding is fine
    pad[1, :3] = 0
    with pytest.raises(ValueError, match="padding attention_mask .* pads 3 positions"):
        model(input_ids=ids, attention_mask=pad, use_cache=False)
    with pytest.raises(ValueError, match="KV cache"):  # decoding a token against a cache
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], cache=out.cache, use_cache=True)
    mistral = AutoModelForCausalLM.from_config(tiny("mistral", sliding_window=8), attn_implementation=IMPLEMENTATION)
    with pytest.raises(ValueError, match="sliding window of 8 tokens, shorter than the sequence \\(16 tokens\\)"):
        mistral(input_ids=ids, use_cache=False)
    AutoModelForCausalLM.from_config(tiny("mistral", sliding_window=16), attn_implementation=IMPLEMENTATION)(
        input_ids=ids, use_cache=False)  # a window as long as the sequence changes nothing
    layer = model.model.layers[0].self_attn
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8)
    for kwargs, feature in (({"dropout": 0.1}, "attention dropout"), ({"softcap": 30.0}, "softcapping"),
                            ({"s_aux": torch.zeros(4)}, "attention sinks"),
                            ({"output_attentions": True}, "output_attentions")):
        with pytest.raises(ValueError, match=feature):
            ring_attention_forward(layer, q, k, k, None, **kwargs)


def _fit(module, steps: int, tmp_path):
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(4)]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    return trainer


def test_hf_causal_lm_checkpoints_and_exports_for_plain_transformers(tmp_path):
    torch.manual_seed(0)
    export = tmp_path / "export"
    module = HFCausalLM(config={"model_type": "qwen3", **FIELDS}, export_dir=str(export),
                        warmup_steps=0, max_steps=2)
    trainer = _fit(module, 2, tmp_path)
    saved = json.loads((export / "config.json").read_text())
    assert IMPLEMENTATION not in json.dumps(saved)  # plain transformers must not look for our function
    plain = AutoModelForCausalLM.from_pretrained(str(export))
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 64, (2, 16))
    module.eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, module.model(input_ids=ids, use_cache=False).logits,
                               atol=TOL, rtol=TOL)
    # Lightning's checkpoint restores the same weights into a fresh module
    ckpt = trainer.checkpoint_callback.best_model_path
    restored = HFCausalLM.load_from_checkpoint(ckpt)
    for (name, p), (_, q) in zip(module.named_parameters(), restored.named_parameters()):
        assert torch.equal(p, q), name
    # and the export is a pretrained directory HFCausalLM starts from
    again = HFCausalLM(str(export))
    assert again.model.config._attn_implementation == IMPLEMENTATION


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 64, (2, 16))
    grads = []
    for checkpointing in ("none", "full"):  # offload pins host memory: CUDA only
        torch.manual_seed(0)
        module = HFCausalLM(config={"model_type": "llama", **FIELDS},
                            checkpointing=checkpointing, checkpoint_every_n_layers=1)
        module.train()
        module(**module.model_inputs({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})).loss.backward()
        grads.append({n: p.grad for n, p in module.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=TOL, rtol=TOL, msg=name)


def test_missing_transformers_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in [n for n in sys.modules if n == "ring_lightning.hf" or n.startswith("ring_lightning.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
        import ring_lightning.hf  # noqa: F401


def test_model_hf_switches_the_module_and_the_data_tokenizer(tmp_path):
    """`python train.py model=hf ...` composes HFCausalLM, the model's tokenizer and checkpointing."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ring_lightning.app.hydra_presets import register_model_presets

    register_model_presets()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "conf")
    fields = ", ".join(f"{k}: {v}" for k, v in FIELDS.items())
    GlobalHydra.instance().clear()
    with initialize_config_dir(conf, version_base="1.3"):
        built = compose("config", overrides=[f"paths.output_dir={tmp_path}", "model=hf", "checkpointing=full",
                                             f"model.config={{model_type: llama, {fields.replace('64,', '300,', 1)}}}"])
        named = compose("config", overrides=[f"paths.output_dir={tmp_path}", "model=hf", "model.name_or_path=/x/y"])
        default = compose("config", overrides=[f"paths.output_dir={tmp_path}"])
    assert (built.data.tokenizer, named.data.tokenizer, default.data.tokenizer) == ("byte", "/x/y", "byte")
    assert default.module._target_ == "ring_lightning.training.module.LongDocumentLM"
    module = instantiate(built.module, _convert_="all")
    assert isinstance(module, HFCausalLM) and module.model.config.vocab_size == 300
    assert module.model.is_gradient_checkpointing and module.tokenizer_name == "byte"
    assert module.export_dir == os.path.join(str(tmp_path), "hf_model")


def test_model_hf_name_or_path_trains_on_the_models_tokenizer(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ring_lightning.app.hydra_presets import register_model_presets

    register_model_presets()
    from hf_fixtures import pretrained_dir

    model_dir = pretrained_dir(tmp_path / "tiny_llama")
    text = tmp_path / "doc.py"
    text.write_text("def g(y):\n    return y * 2\n" * 400)
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))), "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(conf, version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", "model=hf", f"model.name_or_path={model_dir}",
                                           "data=files", f"data.paths=[{text}]", "data.seq_len=64",
                                           f"data.cache_dir={tmp_path / 'cache'}"])
    data = instantiate(cfg.data)
    module = instantiate(cfg.module, _convert_="all")
    assert data.tokenizer_name == model_dir and data.vocab_size == module.model.config.vocab_size != 259
    assert type(data.tokenizer).__name__ == "HFTokenizer"  # the model's, not the byte tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert int(batch["input_ids"].max()) < data.vocab_size
    loss = module(**module.model_inputs(batch)).loss
    assert torch.isfinite(loss)


def test_labels_in_the_hf_convention_are_refused_with_the_fix():
    module = HFCausalLM(config={"model_type": "llama", **FIELDS})
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ValueError, match="strategy.shift_labels=true"):
        module.model_inputs({"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("kwargs, field", [({"lr": 0}, "lr"), ({"weight_decay": -1}, "weight_decay"),
                                           ({"betas": [0.9]}, "betas"), ({"warmup_steps": -1}, "warmup_steps"),
                                           ({"max_steps": 0}, "max_steps"), ({"min_lr_ratio": 2}, "min_lr_ratio")])
def test_hf_module_checks_its_optimizer_arguments_as_the_reference_module(kwargs, field):
    """HFCausalLM and LongDocumentLM share one check (training/schedule.optimizer_settings), before any model is built."""
    with pytest.raises(ValueError, match=f"^{field} must"):
        HFCausalLM(config={"model_type": "llama"}, **kwargs)
