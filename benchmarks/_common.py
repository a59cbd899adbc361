"""Shared plumbing of the GPU scripts: imports, process group, agreement, errors, output.

Only torch and the torch-only ``ring_lightning.attention`` / ``sharding`` / ``flops`` are
needed. The parent package ``ring_lightning/__init__.py`` may import Lightning, Hydra or
datasets; if that import fails (the GPU machine has no hydra-core / datasets), the
submodules are loaded under a bare stand-in parent package instead, so the scripts still
run. Used by the benchmarks here and by ``tests/gpu/gpu_parity.py``.

Every decision that changes what a rank does next (skip a config, stop for time) goes
through ``agree_max`` so that all ranks take the same branch: a rank that branched alone
would leave the others waiting in a collective.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# NVLink multicast must stay off on the lent machines (see the device notes); set before
# torch.distributed creates any NCCL communicator, also when the caller forgot.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def import_engine(*names: str):
    """Return the ``ring_lightning`` submodules ``names`` (default: attention, sequence.sharding),
    without the parent package's extras.

    Only torch-only submodules make sense here: ``attention``, ``sequence.sharding``, ``models.flops``.
    """
    names = names or ("attention", "sequence.sharding")

    def load():
        return tuple(importlib.import_module(f"ring_lightning.{n}") for n in names)

    try:
        return load()
    except ImportError as exc:  # the parent __init__ pulled in something absent here
        for name in [m for m in sys.modules if m == "ring_lightning" or m.startswith("ring_lightning.")]:
            del sys.modules[name]
        pkg = types.ModuleType("ring_lightning")
        pkg.__path__ = [str(ROOT / "ring_lightning")]
        pkg.__file__ = str(ROOT / "ring_lightning" / "__init__.py")
        sys.modules["ring_lightning"] = pkg
        modules = load()
        print(f"[note] ring_lightning/__init__.py failed to import ({exc!r}); loaded "
              f"ring_lightning.{{{','.join(names)}}} without it", flush=True)
        return modules


class Dist:
    """This process's place: rank, world, device, backend (no group when not launched by torchrun)."""

    def __init__(self, dry_run: bool, timeout_s: float) -> None:
        self.launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.cuda = torch.cuda.is_available() and not dry_run
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = None
        if self.launched:
            self.backend = "nccl" if self.cuda else "gloo"
            kwargs = dict(timeout=datetime.timedelta(seconds=timeout_s))
            if self.cuda:
                kwargs["device_id"] = self.device
            try:
                dist.init_process_group(self.backend, **kwargs)
            except TypeError:  # an older torch without device_id
                kwargs.pop("device_id", None)
                dist.init_process_group(self.backend, **kwargs)
        self.rank = dist.get_rank() if self.launched else 0
        self.world = dist.get_world_size() if self.launched else 1
        self.group = dist.group.WORLD if self.launched else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coll_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def agree_max(self, values: Sequence[float]) -> List[float]:
        """Element-wise maximum over ranks (NaN counts as +inf)."""
        vals = [math.inf if (v is None or v != v) else float(v) for v in values]
        if not self.launched or self.world == 1:
            return vals
        t = torch.tensor(vals, dtype=torch.float64, device=self.coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather_objects(self, obj: Any) -> List[Any]:
        if not self.launched or self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.launched and self.world > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self.launched and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - nothing useful to do at exit
                pass

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)


def rel_err(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    """||a - b|| / ||b|| in float64 over entries where ``b`` is finite; inf if finiteness differs.

    NaN anywhere in ``a`` (or a -inf where the reference is finite) gives inf: it never passes.
    """
    if a is None or b is None:
        return math.nan
    a = a.detach().to(torch.float64)
    b = b.detach().to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs reference {tuple(b.shape)}")
    fin = torch.isfinite(b)
    if not bool((torch.isfinite(a) == fin).all()):
        return math.inf
    if not bool(fin.any()):
        return 0.0
    denom = b[fin].norm().item()
    num = (a[fin] - b[fin]).norm().item()
    return num / denom if denom > 0 else num


def out_dir() -> Path:
    d = Path(os.environ.get("OUT") or "bench_out")
    d.mkdir(parents=True, exist_ok=True)
    return d


def env_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001
            info["nccl"] = None
    else:
        info["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    return info


def _clean(x: Any) -> Any:
    """Strict JSON: inf/nan become strings, tuples lists, anything else its repr."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


def write_table(name: str, table: str, device: torch.device, rows: list) -> None:
    """Print a result table and write it as $OUT/<name>.md, with every row in $OUT/<name>.json."""
    print(table, flush=True)
    out = out_dir()
    (out / f"{name}.md").write_text(table + "\n")
    write_json(out / f"{name}.json", dict(env=env_info(device), rows=rows))


def _json_default(x):
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def fmt(x: Optional[float], spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def short_error(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class Clock:
    """Wall-clock budget shared by all ranks (decisions go through Dist.agree_max)."""

    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()
