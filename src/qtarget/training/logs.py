"""Run outputs: per-step metrics as metrics.jsonl and metrics.csv, and curves.png at the end."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from transformers import TrainerCallback

CURVE_KEYS = ("loss", "nll", "p_y", "entropy", "gamma", "clip_frac", "kl_ref", "kl_teacher", "eval_loss",
              "learning_rate", "grad_norm", "tokens_per_s")


class MetricsWriter(TrainerCallback):
    """Keeps the train and eval log history in memory and writes metrics.jsonl (one JSON object per
    log event) and metrics.csv (train rows; rewritten so new columns can appear) on the main process.

    A resumed run starts from the history saved in its checkpoint (trainer_state.json's log_history: every
    event up to the checkpoint's step) and rewrites both files from it, so after a kill and a resume each
    step is in metrics.jsonl, metrics.csv and curves.png exactly once (events logged after the checkpoint
    by the killed run are dropped: the resumed run logs those steps again)."""

    def __init__(self, output_dir: str | os.PathLike, plot: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.plot = plot
        self.train_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []  # train and eval rows in the order they were logged

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_rows, self.eval_rows, self.rows = [], [], []
        resumed = state.global_step > 0
        for logs in state.log_history if resumed else []:  # the checkpoint's history, in logging order
            logs = dict(logs)
            self._add(int(logs.pop("step", 0)), logs.pop("epoch", None), logs)
        if state.is_world_process_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if resumed:
                self._write_all()

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = self._add(int(state.global_step), state.epoch, logs or {})
        if row is None or not state.is_world_process_zero:
            return
        with (self.output_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _add(self, step: int, epoch: float | None, logs: dict[str, Any]) -> dict[str, Any] | None:
        """Record one log event as a train or eval row; None for other events (the end-of-run summary)."""
        row = {"step": step, "epoch": epoch, **{k: _num(v) for k, v in logs.items()}}
        if any(k.startswith("eval_") for k in logs):
            self.eval_rows.append(row)
        elif "loss" in logs:
            self.train_rows.append(row)
        else:
            return None
        self.rows.append(row)
        return row

    def _write_all(self) -> None:
        """metrics.jsonl and metrics.csv from the rows in memory (atomic replace), in step order."""
        tmp = self.output_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.output_dir / "metrics.jsonl")
        self._write_csv()

    def _write_csv(self) -> None:
        rows = self.train_rows
        if not rows:
            (self.output_dir / "metrics.csv").unlink(missing_ok=True)
            return
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        tmp = self.output_dir / "metrics.csv.tmp"
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.output_dir / "metrics.csv")

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and state.is_world_process_zero and self.train_rows:
            plot_curves(self.train_rows, self.eval_rows, self.output_dir / "curves.png")


def _num(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def plot_curves(train_rows: list[dict], eval_rows: list[dict], path: str | os.PathLike,
                title: str | None = None) -> Path:
    """One panel per logged metric against the optimizer step."""
    keys = [k for k in CURVE_KEYS if any(isinstance(r.get(k), (int, float)) for r in train_rows + eval_rows)]
    n = max(len(keys), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        source = eval_rows if key.startswith("eval_") else train_rows
        pts = [(r["step"], r[key]) for r in source if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
