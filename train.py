"""Train a long-document LM with ring attention: the Hydra entry point (configs in conf/).

    python train.py                                   # default: 2 CPU processes (or every GPU),
                                                      # sequence_parallel_size 2, tiny model, stdlib text
    python train.py variant=hilbert compression=topk  # any group option, any field
    python train.py checkpointing=full model=small trainer.max_steps=300
    python train.py -m variant=standard,hilbert       # a sweep (ranks spawned: launch_start_method)
    python train.py -cd recipes -cn retrieval         # a recipe (recipes/README.md)
    python train.py hydra.run.dir=outputs/run1        # a fixed run dir (one run at a time); add
                                                      # resume=true to continue from its newest checkpoint
    python train.py ckpt_path=path/to/last.ckpt       # continue from any checkpoint
    python train.py hydra.run.dir=outputs/new ckpt_path=old/last.ckpt resume_weights_only=true
                                                      # its weights only (another variant, seed, ...)
    torchrun --nproc_per_node=8 train.py hydra.run.dir=outputs/run1   # ranks started by torchrun
    python train.py -cd recipes -cn slurm_multinode -m hydra/launcher=slurm   # SLURM (submitit)

Outputs go to hydra's run dir (outputs/<date>/<time>, or multirun/... under -m):
metrics.jsonl and metrics.png (every logged value; loss, tokens/s, memory), checkpoints/, the
offline wandb run (view it with `wandb leet <dir>`, upload it with `wandb sync <dir>`), the
composed config; a sweep adds sweep_summary.md/.csv/.png to its multirun dir.
Under torchrun every rank composes its own config: fix hydra.run.dir so they agree.
"""

from ring_lightning.training.console import quiet_third_party

quiet_third_party()  # before the imports that warn; ranks Lightning starts re-run this file

import hydra
from lightning.pytorch.accelerators import CUDAAccelerator
from omegaconf import DictConfig, OmegaConf

from ring_lightning.app.train import flat_config, train  # noqa: F401 (flat_config: its old home)
from ring_lightning.app.hydra_presets import register_model_presets

CUDA_AVAILABLE = CUDAAccelerator.is_available()  # fork-safe: does not initialise CUDA
# ${if_cuda:a,b} is a when CUDA is available, else b: conf/trainer/default.yaml uses it so the
# defaults take every GPU when there are GPUs and 2 CPU processes otherwise.
OmegaConf.register_new_resolver("if_cuda", lambda a, b: a if CUDA_AVAILABLE else b, replace=True)
register_model_presets()  # the `model` group: ring_lightning.models.model.PRESETS, no YAML copies


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    """The Hydra entry: ring_lightning.app.train.train does the run."""
    return train(cfg)


if __name__ == "__main__":
    main()
