"""What this machine has for the run: visible GPUs, the processes per node, GPU and host memory.

The pre-flight's other parts ask here (through the module, so a test can stand in for a machine).
"""

from __future__ import annotations

import os
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from ring_lightning.preflight.errors import ConfigError


def visible_gpus() -> int:
    from lightning.pytorch.accelerators import CUDAAccelerator

    return CUDAAccelerator.auto_device_count() if CUDAAccelerator.is_available() else 0


def devices_per_node(trainer: DictConfig) -> int:
    """Processes Lightning starts on one node for ``trainer.accelerator`` / ``trainer.devices``."""
    accelerator, devices = str(trainer.get("accelerator", "auto")), trainer.get("devices", "auto")
    gpus = visible_gpus()
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is visible here; "
                          f"run on CPU with trainer=cpu (2 processes) or trainer.accelerator=cpu")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        return gpus if on_gpu else 1
    count = len(devices) if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else devices
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"trainer.devices={devices!r} is not valid; valid values: a number >= 1, a list of "
                          f"device indices, or auto")
    if on_gpu and count > gpus:
        raise ConfigError(f"trainer.devices={devices} but {gpus} CUDA device(s) are visible; set "
                          f"trainer.devices={gpus} (or auto)")
    return count


def cpu_oversubscription(trainer: DictConfig, per_node: int) -> List[str]:
    """A note (not an error) when more CPU processes are asked for than this machine has cores."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and visible_gpus() > 0):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if per_node <= cores:
        return []
    return [f"note: trainer.devices={per_node} starts {per_node} CPU processes on {cores} core(s): they share "
            f"the cores, so each step is slower than with trainer.devices={cores} (results are the same)"]


def gpu_memory_bytes() -> Optional[int]:
    """Total memory of the first GPU the run uses (torch.cuda; None without CUDA). The launching
    process becomes rank 0 (or spawns the ranks): Lightning's launchers never fork it."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:  # under torchrun every rank asks for its own device (LOCAL_RANK), not all for device 0
        index = int(os.environ.get("LOCAL_RANK", 0) or 0) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(index).total_memory
    except (RuntimeError, ValueError):
        return None  # a driver that cannot say: the device check is skipped, the run says it itself


def host_available_bytes() -> Optional[int]:
    """Host memory available now: psutil if installed, else /proc/meminfo's MemAvailable (None: unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None
