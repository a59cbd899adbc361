"""Every option of every config group in conf/ and every recipe in recipes/ composes and
instantiates: datamodule, module (on the meta device: no memory, no init time), strategy,
loggers, callbacks, and the Trainer where its accelerator exists here. Nothing trains."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import OmegaConf

from ring_lightning.attention import RingAttentionBase
from ring_lightning.data import LongDocumentDataModule
from ring_lightning.models.model import PRESETS, ModelConfig
from ring_lightning.training.module import LongDocumentLM
from ring_lightning.parallel.fsdp import RingFSDPStrategy
from ring_lightning.parallel.strategy import RingStrategy

ROOT = Path(__file__).resolve().parents[3]
CONF, RECIPES = ROOT / "conf", ROOT / "recipes"
GROUPS = ("variant", "compression", "checkpointing", "model", "data", "module", "strategy",
          "trainer", "logger", "callbacks", "experiment")
# The `model` group is registered from ring_lightning.models.model.PRESETS (no YAML in conf/model).
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
OPTIONS += [("model", name) for name in sorted(PRESETS)]
RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
MODEL_PRESETS = {"tiny", "small", "350m", "1b", "3b", "8b"}


def _load_train_module():
    """Import train.py (not a package module): it registers the `if_cuda` resolver."""
    spec = importlib.util.spec_from_file_location("ring_train", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _load_train_module()


def compose_cfg(tmp_path, overrides=(), recipe=None, hydra_node=False):
    """Compose conf/config.yaml (or a recipe, as `-cd recipes -cn <recipe>` does)."""
    GlobalHydra.instance().clear()
    config_dir, name = (RECIPES, recipe) if recipe else (CONF, "config")
    search = [f"hydra.searchpath=[file://{CONF}]"] if recipe else []
    files = tmp_path / "doc.txt"
    files.write_text("a long document\n" * 500)
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose(name, overrides=[*search, f"paths.output_dir={tmp_path}", *overrides],
                      return_hydra_config=hydra_node)
    if cfg.data.source == "files":
        cfg.data.paths = [str(files)]  # the one mandatory value (???) in conf/
    return cfg


def instantiate_all(cfg):
    """Build every object train.py builds, without training; return them by name."""
    datamodule = instantiate(cfg.data)
    with torch.device("meta"):  # a 1B model costs nothing here
        module = instantiate(cfg.module, _convert_="all")
    strategy = instantiate(cfg.strategy)
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert isinstance(datamodule, LongDocumentDataModule)
    assert isinstance(module, LongDocumentLM)
    assert isinstance(strategy, (RingStrategy, RingFSDPStrategy))
    if not loggers:  # Lightning's LR monitor raises at fit time without a logger
        assert not any(isinstance(c, LearningRateMonitor) for c in callbacks)
    trainer_args = {k for k in cfg.trainer if k != "_target_"}
    assert trainer_args <= set(inspect.signature(Trainer.__init__).parameters), trainer_args
    trainer = None
    if cfg.trainer.accelerator == "cpu":  # a GPU trainer cannot be built on a CPU machine
        trainer = instantiate(cfg.trainer, strategy=strategy, logger=loggers or False, callbacks=callbacks)
    return dict(datamodule=datamodule, module=module, strategy=strategy, loggers=loggers,
                callbacks=callbacks, trainer=trainer)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_instantiates(tmp_path, group, option):
    cfg = compose_cfg(tmp_path, [f"{group}={option}"])
    objs = instantiate_all(cfg)
    if group == "variant":
        cores = [m for m in objs["module"].modules() if isinstance(m, RingAttentionBase)]
        assert cores and all(type(c).__name__.lower().startswith(option.replace("_", "")) for c in cores)
    if group == "compression":
        assert objs["strategy"].compression == option
    if group == "checkpointing":
        config = objs["module"].model.config
        if option == "offload":  # full checkpointing with the kept inputs on the host, MLP tiles
            assert (config.checkpointing, config.offload_activations, config.mlp_tile_tokens > 0) == ("full", True, True)
        else:
            assert config.checkpointing == option and not config.offload_activations


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_every_recipe_composes_and_instantiates(tmp_path, recipe):
    cfg = compose_cfg(tmp_path, recipe=recipe)
    objs = instantiate_all(cfg)
    # The sequence must split over the group and fit the attention pattern.
    sp, seq_len = cfg.strategy.sequence_parallel_size, cfg.data.seq_len
    if sp == "auto":  # every device of the node
        sp = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    assert seq_len % (2 * sp) == 0
    objs["module"].attention_config.patterns(seq_len)  # ValueError if a segment does not divide
    ulysses = cfg.strategy.ulysses_size  # the all-to-all splits the heads (and, else replicated, kv heads)
    assert sp % ulysses == 0 and objs["module"].model.config.n_heads % ulysses == 0


def test_ulysses_size_override_reaches_the_strategy_and_bad_values_name_it(tmp_path):
    cfg = compose_cfg(tmp_path, ["strategy.sequence_parallel_size=2", "strategy.ulysses_size=2"])
    assert instantiate_all(cfg)["strategy"].ulysses_size == 2
    cfg = compose_cfg(tmp_path, ["strategy.sequence_parallel_size=4", "strategy.ulysses_size=3"])
    with pytest.raises(Exception, match=r"strategy.ulysses_size=3 .*valid values: \[1, 2, 4\]"):
        instantiate(cfg.strategy)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_recipe_header_gives_its_launch_command(recipe):
    header = (RECIPES / f"{recipe}.yaml").read_text().split("defaults:")[0]
    assert f"python train.py -cd recipes -cn {recipe}" in header
    assert "Measures:" in header
    assert f"`{recipe}`" in (RECIPES / "README.md").read_text(), "recipe missing from recipes/README.md"


def test_default_config_trains_on_two_cpu_processes_with_sp2(tmp_path):
    cfg = compose_cfg(tmp_path)
    if not TRAIN.CUDA_AVAILABLE:
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("cpu", 2, "32-true")
    assert cfg.strategy.sequence_parallel_size == "auto"  # every device of the node: 2 here, 1 on one GPU
    assert cfg.data.source == "stdlib" and cfg.logger.wandb.offline is True
    ckpt = cfg.callbacks.model_checkpoint
    assert ckpt.save_last and ckpt.every_n_train_steps > 0 and cfg.trainer.max_steps % ckpt.every_n_train_steps == 0
    trainer = instantiate_all(cfg)["trainer"]  # a CPU trainer: this test machine has no CUDA
    assert trainer is not None and trainer.num_devices == 2
    assert trainer.strategy.sequence_parallel_size == 2


@pytest.mark.parametrize("devices, sp", [(1, 1), (2, 2)])
def test_default_sequence_parallel_size_fits_the_machine(tmp_path, devices, sp):
    """`python train.py trainer.devices=1` (one GPU or CPU) needs no strategy override."""
    cfg = compose_cfg(tmp_path, [f"trainer.devices={devices}", "trainer.accelerator=cpu"])
    assert instantiate_all(cfg)["trainer"].strategy.sequence_parallel_size == sp


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_configs_match_the_named_presets(tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"model={name}"])
    fields = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "checkpointing"}
    assert ModelConfig(**fields) == ModelConfig.preset(name)


def test_model_group_is_the_python_presets_and_takes_any_field(tmp_path):
    """One source: conf/ has no model YAML; every field overrides; derived fields re-derive."""
    assert not list((CONF / "model").glob("*.yaml"))
    assert MODEL_PRESETS == set(PRESETS)
    cfg = compose_cfg(tmp_path, ["model=tiny", "model.dim=128", "model.rope_theta=5e5"])
    model = ModelConfig.from_any(OmegaConf.to_container(cfg.model, resolve=True))  # vocab: the byte tokenizer's
    assert model == ModelConfig.preset("tiny", dim=128, rope_theta=5e5)
    assert model.hidden_dim == ModelConfig(dim=128).hidden_dim  # re-derived from the new dim


def test_sweep_recipe_patterns_resolve_to_valid_attention(tmp_path):
    cfg = compose_cfg(tmp_path, recipe="sweep_dilation", hydra_node=True)
    patterns = cfg.hydra.sweeper.params.pattern.split(",")
    assert sorted(patterns) == sorted(cfg.patterns)
    for pattern in patterns:
        cfg = compose_cfg(tmp_path, [f"pattern={pattern}"], recipe="sweep_dilation")
        with torch.device("meta"):
            module = instantiate(cfg.module, _convert_="all")
        module.attention_config.patterns(cfg.data.seq_len)


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(RECIPES), version_base="1.3"):
        cfg = compose("slurm_multinode", overrides=[f"hydra.searchpath=[file://{CONF}]", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_resume_choice_prefers_ckpt_path_then_the_newest_checkpoint(tmp_path):
    from ring_lightning.app.run_dir import choose

    cfg = compose_cfg(tmp_path)
    ckpt_dir = cfg.callbacks.model_checkpoint.dirpath
    assert choose(cfg, ckpt_dir).ckpt_path is None
    last = Path(ckpt_dir) / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 1}, last)  # a complete checkpoint file (damaged ones are skipped)
    assert choose(cfg, ckpt_dir).ckpt_path is None  # resume=false: a fresh run
    cfg.resume = True
    assert choose(cfg, ckpt_dir).ckpt_path == str(last)
    elsewhere = tmp_path / "elsewhere.ckpt"
    torch.save({"global_step": 7}, elsewhere)
    cfg.ckpt_path = str(elsewhere)
    assert (choose(cfg, ckpt_dir).ckpt_path, choose(cfg, ckpt_dir).step) == (str(elsewhere), 7)
