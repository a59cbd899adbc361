"""The end of a sweep (``python train.py -m ...``): one table and one plot of its jobs' final metrics.

``SweepSummary`` is a Hydra callback (``conf/config.yaml``: ``hydra.callbacks``). When the
sweep ends it reads every job's ``metrics.jsonl`` (``run_report.MetricsFile``) and the
overrides Hydra saved beside it, so it works for any launcher (the jobs may have run
elsewhere, e.g. under SLURM), and writes into the sweep directory:

* ``sweep_summary.md`` and ``sweep_summary.csv``: one row per job, its overrides, the
  optimizer steps it did (``step``) and the last value of each metric in ``METRICS``;
* ``sweep_summary.png``: those metrics per job, one bar chart each, bars labelled with the
  job's overrides.
"""

from __future__ import annotations

import csv
import glob
import os
from typing import Any, Dict, List

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ring_lightning.app.run_report import METRICS_FILE, final_metrics

METRICS = ("train/loss", "val/loss", "val/ppl", "val/retrieval_acc", "perf/tokens_per_s", "perf/peak_memory_mb")


def collect_jobs(sweep_dir: str) -> List[Dict[str, Any]]:
    """{job, overrides, step, <metric>...} of every job directory of a sweep that logged metrics."""
    jobs = []
    for overrides_file in glob.glob(os.path.join(sweep_dir, "**", ".hydra", "overrides.yaml"), recursive=True):
        job_dir = os.path.dirname(os.path.dirname(overrides_file))
        metrics_path = os.path.join(job_dir, METRICS_FILE)
        if not os.path.isfile(metrics_path):
            continue
        overrides = [o for o in OmegaConf.load(overrides_file) if not str(o).startswith("hydra.")]
        final = final_metrics(metrics_path)
        jobs.append({"job": os.path.relpath(job_dir, sweep_dir), "overrides": " ".join(map(str, overrides)),
                     "step": final.get("step"), **{m: final[m] for m in METRICS if m in final}})
    return sorted(jobs, key=lambda j: (len(j["job"]), j["job"]))


def write_summary(sweep_dir: str) -> Dict[str, str]:
    """Write the table (md, csv) and the plot of a sweep; returns {kind: path} (empty: no job logged)."""
    jobs = collect_jobs(sweep_dir)
    if not jobs:
        return {}
    columns = ["job", "overrides", "step"] + [m for m in METRICS if any(m in j for j in jobs)]
    paths = {kind: os.path.join(sweep_dir, f"sweep_summary.{kind}") for kind in ("md", "csv", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(jobs)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(j.get(c)) for c in columns) + " |" for j in jobs]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(jobs, columns[3:], paths["png"])
    return paths


def _plot(jobs: List[Dict[str, Any]], metrics: List[str], png: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * max(1, len(metrics)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    # bars at numeric positions, labelled with the job's overrides (string positions that
    # parse as numbers make matplotlib log "Using categorical units..." once per bar)
    labels = bar_labels(jobs)
    for ax, metric in zip(axes, metrics):
        ax.bar(range(len(jobs)), [j.get(metric, float("nan")) for j in jobs])
        ax.set_xticks(range(len(jobs)), labels, rotation=30 if len(jobs) > 3 else 0, ha="right" if len(jobs) > 3 else "center",
                      fontsize=8)
        ax.set_title(metric)
    fig.suptitle("sweep: final metrics per job (step = optimizer steps done; table: sweep_summary.md)")
    fig.savefig(png, dpi=100)


def bar_labels(jobs: List[Dict[str, Any]]) -> List[str]:
    """Each job's overrides that not every job shares, one per line (``job <n>`` when none)."""
    words = [str(j["overrides"]).split() for j in jobs]
    shared = set.intersection(*map(set, words)) if len(jobs) > 1 else set()
    return ["\n".join(w for w in ws if w not in shared) or f"job {j['job']}" for ws, j in zip(words, jobs)]


class SweepSummary(Callback):
    """Hydra callback: the sweep's table and plot when every job has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        paths = write_summary(sweep_dir)
        if paths:
            print(f"\n== sweep finished: {len(collect_jobs(sweep_dir))} jobs ==\n" + open(paths["md"]).read()
                  + f"table {paths['md']} (and .csv)\nplot  {paths['png']}", flush=True)
