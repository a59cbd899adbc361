"""train.py end to end: 2 CPU processes (gloo), sequence_parallel_size 2, a few steps.

Each run is a subprocess with a hard timeout: every variant (no compression), every
compression option (standard variant, activation checkpointing on), resume from a
checkpoint, a 2-job `-m` sweep, and the default (offline wandb) logger. ~3 min on 2 cores.
"""

import csv
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from train_runner import RUN_TIMEOUT_S, final_metrics, run_train

from ring_lightning.app.run_report import final_metrics as run_final, read_metrics
from ring_lightning.app.sweep_report import bar_labels, collect_jobs

SWEEP_TIMEOUT_S = 420
# pytest-timeout's limit per test, above the subprocess limits (a test runs up to 2 of them).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)]
# Small everything: 256 tokens (128 per rank), 4 steps, a checkpoint and a validation at the end.
TINY = ["data.seq_len=256", "data.batch_size=2", "data.max_tokens=40000", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", "module.warmup_steps=1", "logger=csv"]


VARIANTS = ["standard", "hilbert", "distributed", "block_sparse"]
COMPRESSIONS = ["topk", "randomk", "powersgd", "bf16"]  # "none" runs in every variant test


def check_run(out: str, run_dir: Path) -> None:
    metrics = final_metrics(out)
    assert 0 < metrics["train/loss"] < 10 and 0 < metrics["val/loss"] < 10, metrics
    assert metrics["step"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    check_metrics_file(out, run_dir)


def check_metrics_file(out: str, run_dir: Path) -> None:
    """metrics.jsonl holds exactly what the CSV logger got (same steps, same values); the summary
    names it and metrics.png, a real PNG."""
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        logged = {(int(r["step"]), k): float(v) for r in csv.DictReader(f) for k, v in r.items() if v and k != "step"}
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    ours = {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}
    assert ours == logged and any(k == "train/loss" for _, k in ours) and any(k == "val/loss" for _, k in ours)
    assert run_final(str(run_dir / "metrics.jsonl"))["val/loss"] == pytest.approx(final_metrics(out)["val/loss"],
                                                                                  abs=1e-4)
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"metrics      {run_dir / 'metrics.jsonl'}" in out and f"plot         {run_dir / 'metrics.png'}" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_runs_each_variant(tmp_path, data_cache, variant):
    out = run_train([f"variant={variant}", f"hydra.run.dir={tmp_path}", *TINY], data_cache)
    check_run(out, tmp_path)


def test_train_runs_with_the_all_to_all_over_heads(tmp_path, data_cache):
    """`strategy.ulysses_size=2` on 2 processes (Ulysses alone: rings of one rank), packed
    documents and recomputed blocks passing through the all-to-all."""
    out = run_train(["strategy.ulysses_size=2", "checkpointing=selective", f"hydra.run.dir={tmp_path}", *TINY],
                    data_cache)
    check_run(out, tmp_path)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    a2a = [float(r["ring/all_to_all_volume_mb"]) for r in rows if r.get("ring/all_to_all_volume_mb")]
    ring = [float(r["ring/comm_volume_mb"]) for r in rows if r.get("ring/comm_volume_mb")]
    assert a2a and min(a2a) > 0 and ring and max(ring) == 0, (a2a, ring)


def test_train_runs_on_one_device_with_the_defaults(tmp_path, data_cache):
    """One device (as on a machine with one GPU): sequence_parallel_size=auto resolves to 1."""
    out = run_train(["trainer.devices=1", f"hydra.run.dir={tmp_path}", *TINY], data_cache)
    check_run(out, tmp_path)
    assert "does not divide" not in out


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_train_runs_each_compression(tmp_path, data_cache, compression):
    # Activation checkpointing rides along: recomputation must not disturb the comm hooks.
    checkpointing = "full" if compression in ("topk", "powersgd") else "selective"
    out = run_train([f"compression={compression}", f"checkpointing={checkpointing}",
                     f"hydra.run.dir={tmp_path}", *TINY], data_cache)
    check_run(out, tmp_path)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        ratios = [float(r["ring/compression_ratio"]) for r in csv.DictReader(f) if r.get("ring/compression_ratio")]
    assert ratios and ratios[-1] < 1.0, ratios  # the hook really sent fewer bytes than dense


def test_resume_continues_from_last_checkpoint(tmp_path, data_cache):
    first = run_train([f"hydra.run.dir={tmp_path}", *TINY, "trainer.max_steps=2"], data_cache)
    assert final_metrics(first)["step"] == 2
    # Same run dir + resume=true: picks up checkpoints/last.ckpt and trains steps 3-4 only.
    second = run_train([f"hydra.run.dir={tmp_path}", *TINY, "resume=true"], data_cache)
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.ckpt'}" in second
    assert "Restored all states from the checkpoint" in second
    assert final_metrics(second)["step"] == 4


def test_explicit_ckpt_path_resumes_in_a_new_run_dir(tmp_path, data_cache):
    run_train([f"hydra.run.dir={tmp_path / 'a'}", *TINY, "trainer.max_steps=2"], data_cache)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    out = run_train([f"hydra.run.dir={tmp_path / 'b'}", *TINY, f"ckpt_path={ckpt}"], data_cache)
    assert f"resumed from {ckpt}" in out and final_metrics(out)["step"] == 4


def test_multirun_sweep_runs_each_job_with_spawned_ranks(tmp_path, data_cache):
    # Under -m, train.py spawns the ranks: Lightning's default launcher would re-run the sweep.
    out = run_train(["-m", "variant=standard,hilbert", f"hydra.sweep.dir={tmp_path}", *TINY], data_cache,
                    timeout=SWEEP_TIMEOUT_S)
    assert out.count("== ring_lightning run finished ==") == 2
    summaries = out.split("== ring_lightning run finished ==")[1:]  # one per job, in job order
    for job, variant, summary in zip(("0", "1"), ("standard", "hilbert"), summaries):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file()
        check_metrics_file(summary, tmp_path / job)
        # steps done, and a continue command for this job alone: its own overrides, its dir, more steps
        assert final_metrics(summary)["step"] == 4
        command = next(ln for ln in summary.splitlines() if ln.startswith("continue ")).split()[1:]
        job_overrides = [o for o in OmegaConf.load(tmp_path / job / ".hydra" / "overrides.yaml")
                         if not o.startswith(("hydra.", "trainer.max_steps="))]
        assert command == ["python", "train.py", *job_overrides, f"hydra.run.dir={tmp_path / job}", "resume=true",
                           "trainer.max_steps=8"] and f"variant={variant}" in command
        # the job's own log holds what it printed: progress (spawned rank 0), summary; rank 1 has its file
        log = (tmp_path / job / "train.log").read_text()
        assert "step 4/4" in log and "== ring_lightning run finished ==" in log and "final        step 4" in log
        assert (tmp_path / job / "train_ddp_process_1.log").read_text().startswith("== ring_lightning rank 1")
    assert not (tmp_path / "2").exists()  # no job re-launched the sweep
    # the sweep's table: one row per job with its overrides, steps done and final metrics (conf: hydra.callbacks)
    with open(tmp_path / "sweep_summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["overrides"].split()[0] for r in table] == ["variant=standard", "variant=hilbert"]
    assert [int(r["step"]) for r in table] == [4, 4]
    for job, row in zip(("0", "1"), table):
        assert float(row["val/loss"]) == run_final(str(tmp_path / job / "metrics.jsonl"))["val/loss"]
    assert "| job | overrides | step |" in (tmp_path / "sweep_summary.md").read_text()
    assert (tmp_path / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert bar_labels(collect_jobs(str(tmp_path))) == ["variant=standard", "variant=hilbert"]  # the plot's bars
    assert f"table {tmp_path / 'sweep_summary.md'}" in out
    assert "categorical units" not in out and "<more than" not in out


def test_a_module_of_your_own_trains_through_train_py_as_the_readme_says(tmp_path, data_cache):
    """examples/own_module.py's OwnLM through train.py (examples/conf/module/own_lm.yaml), sp=2: the
    strategy logs its exact train/group_loss and the continue command keeps the search path."""
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": os.pathsep.join([str(root / "examples"), os.environ.get("PYTHONPATH", "")])}
    out = run_train(["hydra.searchpath=[file://examples/conf]", "module=own_lm", f"hydra.run.dir={tmp_path}",
                     *[o for o in TINY if not o.startswith("module.")]], data_cache, env=env)
    metrics = final_metrics(out)
    assert metrics["step"] == 4 and 0 < metrics["train/group_loss"] < 10
    assert "'hydra.searchpath=[file://examples/conf]' module=own_lm" in out  # the continue command, shell-quoted
    assert "== ring_lightning run finished ==" in (tmp_path / "train.log").read_text()


def test_default_logger_writes_an_offline_wandb_run(tmp_path, data_cache):
    out = run_train([f"hydra.run.dir={tmp_path}", *TINY, "logger=wandb"], data_cache)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, out[-3000:]
    assert f"wandb sync {runs[0]}" in out and f"wandb leet {runs[0]}" in out
    assert (tmp_path / "metrics.png").is_file() and f"plot         {tmp_path / 'metrics.png'}" in out
    # quiet by default: no third-party deprecations, tips or terminal control codes in a log
    for noise in ("deprecated", "Tip:", "\x1b[", "\r", "anonymous setting", "Run history"):
        assert noise not in out, noise


@pytest.mark.integration
def test_readme_quickstart_runs_as_written(tmp_path):
    """The README's plugin example (examples/quickstart.py) trains on 2 CPU processes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    example = (root / "examples" / "quickstart.py").read_text()
    assert example in (root / "README.md").read_text()  # the README shows exactly this file
    env = dict(os.environ, MAX_STEPS="2", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # quiet, and it writes where the README says (not ./checkpoints)
    out = proc.stdout + proc.stderr
    for noise in ("Tip:", "deprecated", "\r", "\x1b["):
        assert noise not in out, (noise, out[-3000:])
    assert "step 2/2" in out
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "outputs" / "quickstart" / "checkpoints").is_dir()
