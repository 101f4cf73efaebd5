"""What a run reports, all on rank 0: one line per step in training_metrics.jsonl, a progress bar on a terminal or
plain lines in a log file, an optional tracker (TensorBoard or Weights & Biases), a picture of the run
(training_metrics.png), and a summary at the end.

None of it can stop training: the model and its states are what a run is for, so a report that cannot be written
(a full disk, a plotting error, a tracker that fails) is warned about once and skipped from then on."""

import datetime
import json
import math
import netrc
import os
import sys
import time
from pathlib import Path

from utils import atomic_write

METRICS_FILE = "training_metrics.jsonl"
PLOT_FILE = "training_metrics.png"
LOG_EVERY_S = 30.0  # a log file gets a progress line at most this often (and at the first step, evals, the last)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The lines of training_metrics.jsonl by step; a resumed run repeats steps, and the later line counts. A line
    cut short by a kill is skipped."""
    by_step = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


# ----------------------------------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, plain lines in a log file (no '\r')


def progress_line(metrics: dict, stop_step: int) -> str:
    parts = [f"step {metrics['step']}/{stop_step}", f"loss {metrics['loss']:.4f}"]
    if metrics.get("eval_loss") is not None:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    parts += [f"lr {metrics['lr']:.2e}", f"grad_norm {metrics['grad_norm']:.3f}",
              f"{metrics['tokens_per_second']:,.0f} tok/s"]
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


class ProgressDisplay:
    """tqdm on a terminal; in a log file (stderr not a tty), a plain line every LOG_EVERY_S seconds, at the first
    step, at every evaluation and at the last step, with the time left."""

    def __init__(self, first_step: int, stop_step: int, stream=None):
        self.stream = stream or sys.stderr
        self.first_step, self.stop_step = first_step, stop_step
        self.start = self.last_line = time.time()
        self.last_eval_loss: float | None = None  # the bar keeps showing it
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stop_step, initial=first_step, desc="train", file=self.stream, dynamic_ncols=True)

    def update(self, metrics: dict) -> None:
        step, now = metrics["step"], time.time()
        if metrics.get("eval_loss") is not None:
            self.last_eval_loss = metrics["eval_loss"]
        if self.bar is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok_s": f"{metrics['tokens_per_second']:.0f}"}
            if self.last_eval_loss is not None:
                postfix["eval_loss"] = f"{self.last_eval_loss:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        due = (step == self.first_step + 1 or step == self.stop_step or metrics.get("eval_loss") is not None
               or now - self.last_line >= LOG_EVERY_S)
        if due:
            self.last_line = now
            elapsed = now - self.start
            left = elapsed / (step - self.first_step) * (self.stop_step - step)
            print(f"{progress_line(metrics, self.stop_step)} | {format_duration(elapsed)} elapsed, "
                  f"{format_duration(left)} left", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------------
# Trackers, each imported only when asked for


def wandb_api_key_found() -> bool:
    """WANDB_API_KEY, or the key `wandb login` stores in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Tracker:
    """TensorBoard (event files in output_dir/tensorboard) or Weights & Biases (WANDB_MODE respected; offline
    into output_dir/wandb when no API key is found, which it says). Logs every numeric metric of each step."""

    def __init__(self, report_to: str, output_dir: str | os.PathLike, run_params: dict):
        self.report_to = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            mode = os.environ.get("WANDB_MODE") or None
            if mode is None and not wandb_api_key_found():
                mode = "offline"
                print(f"wandb: no API key (WANDB_API_KEY or `wandb login`): logging offline into "
                      f"{Path(output_dir) / 'wandb'}; upload it later with `wandb sync`", flush=True)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mini_trainer"), dir=str(output_dir),
                                  name=Path(output_dir).resolve().name, config=run_params, mode=mode)

    def log(self, metrics: dict) -> None:
        step = metrics["step"]
        values = {name: value for name, value in metrics.items() if name != "step" and value is not None
                  and isinstance(value, int | float) and not isinstance(value, bool)}
        if self.report_to == "tensorboard":
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        elif self.report_to == "wandb":
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.report_to == "tensorboard":
            self.writer.close()
        elif self.report_to == "wandb":
            self.run.finish()


# ----------------------------------------------------------------------------------------------------------------------
# The picture of the run


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Six panels from training_metrics.jsonl: loss and eval loss, LR, gradient norm, tokens/s, MFU and GPU
    memory; a panel without data (MFU and memory on CPU) says so. Skipped steps are marked on the loss panel.
    Drawn on matplotlib's Agg canvas directly, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)

    def series(name: str) -> tuple[list, list]:
        points = [(r["step"], r[name]) for r in rows if r.get(name) is not None and math.isfinite(r[name])]
        return [s for s, _ in points], [v for _, v in points]

    figure = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).flatten()
    panels = [("loss", "loss", ["loss", "eval_loss"]), ("learning rate", "lr", ["lr"]),
              ("gradient norm (before clipping)", "norm", ["grad_norm"]),
              ("throughput (all ranks)", "tokens/s", ["tokens_per_second"]), ("MFU", "% of bf16 peak", ["mfu"]),
              ("peak GPU memory", "GB", ["peak_memory_gb"])]
    no_data = {"mfu": "no MFU: not on a GPU with a known bf16 peak", "peak_memory_gb": "no GPU memory: not on a GPU"}
    for ax, (title, unit, names) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        plotted = False
        for name in names:
            steps, values = series(name)
            if name == "mfu":
                values = [100 * v for v in values]
            if steps:
                ax.plot(steps, values, marker="o" if name == "eval_loss" else None, markersize=4, label=name)
                plotted = True
        if not plotted:
            ax.text(0.5, 0.5, no_data.get(names[0], "no data yet"), ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        if len(names) > 1 and plotted:
            ax.legend()
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for i, step in enumerate(skipped):
        axes[0].axvline(step, color="red", alpha=0.3, label=None if i else "skipped step")
    if skipped:
        axes[0].legend()
    figure.suptitle(f"{Path(metrics_path).parent.resolve().name}: {len(rows)} steps")
    with atomic_write(png_path, "wb") as f:
        figure.savefig(f, format="png", dpi=80)


# ----------------------------------------------------------------------------------------------------------------------
# The run's report


class RunReport:
    """Rank 0's record of the run; on every other rank each method does nothing."""

    def __init__(self, output_dir: str | os.PathLike, first_step: int, stop_step: int, report_to: str,
                 run_params: dict, enabled: bool):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.first_step, self.stop_step = first_step, stop_step
        self.failed: set[str] = set()  # what stopped working, warned about once
        self.last: dict = {}
        self.totals = {"steps": 0, "samples": 0, "tokens": 0, "step_seconds": 0.0, "flops": 0.0}
        self.metrics_file = None  # opened at the first line
        self.tracker: Tracker | None = None
        if not enabled:
            return
        if report_to != "none":
            self._try(f"starting {report_to}", self._start_tracker, report_to, output_dir, run_params)
        self.progress = ProgressDisplay(first_step, stop_step)  # after the tracker: its clock times the steps

    def _start_tracker(self, report_to: str, output_dir: str | os.PathLike, run_params: dict) -> None:
        self.tracker = Tracker(report_to, output_dir, run_params)

    def _try(self, what: str, action, *args) -> None:
        """Runs `action` unless it failed before; the first failure is warned about, once."""
        if what in self.failed:
            return
        try:
            action(*args)
        except Exception as e:  # a report is never worth the run: disk full, matplotlib missing, tracker down
            self.failed.add(what)
            print(f"warning: {what} failed ({type(e).__name__}: {e}); training goes on without it",
                  file=sys.stderr, flush=True)

    def _write_line(self, metrics: dict) -> None:
        if self.metrics_file is None:
            self.metrics_file = open(self.output_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()

    def log(self, metrics: dict, step_seconds: float, flops: float) -> None:
        """One step: its line in the metrics file, the tracker, the progress display."""
        self.totals["steps"] += 1
        self.totals["samples"] += metrics["num_samples"]
        self.totals["tokens"] += metrics["num_tokens"]
        self.totals["step_seconds"] += step_seconds
        self.totals["flops"] += flops
        self.last = metrics
        if not self.enabled:
            return
        self._try(f"writing {METRICS_FILE}", self._write_line, metrics)
        if self.tracker is not None:
            self._try(f"logging to {self.tracker.report_to}", self.tracker.log, metrics)
        self.progress.update(metrics)

    def plot(self) -> None:
        if self.enabled:
            self._try(f"plotting {PLOT_FILE}", plot_metrics, self.output_dir / METRICS_FILE,
                      self.output_dir / PLOT_FILE)

    def finish(self, stop_reason: str, total_steps: int, wall_seconds: float, peak_flops_all_ranks: float | None,
               last_checkpoint: Path | None, last_state: Path | None) -> None:
        """The last picture, the files closed, and the summary printed."""
        if not self.enabled:
            return
        self.plot()
        self.close()
        print(self.summary(stop_reason, total_steps, wall_seconds, peak_flops_all_ranks, last_checkpoint, last_state),
              flush=True)

    def summary(self, stop_reason: str, total_steps: int, wall_seconds: float, peak_flops_all_ranks: float | None,
                last_checkpoint: Path | None, last_state: Path | None) -> str:
        """What the run did: steps, samples, tokens, times, mean throughput, final losses, where its outputs are."""
        t = self.totals
        step = self.last.get("step", self.first_step)
        tokens_per_second = t["tokens"] / t["step_seconds"] if t["step_seconds"] else 0.0
        mfu = (f"{100 * t['flops'] / t['step_seconds'] / peak_flops_all_ranks:.1f}%"
               if peak_flops_all_ranks and t["step_seconds"] else "n/a (no known GPU peak)")
        losses = f"final loss {self.last['loss']:.4f}" if self.last else "no step taken"
        if self.progress.last_eval_loss is not None:  # the display keeps the latest
            losses += f", eval loss {self.progress.last_eval_loss:.4f}"
        return "\n".join([
            f"{stop_reason} at step {step} of {total_steps}: {t['steps']} steps in this run, {t['samples']:,} "
            f"samples, {t['tokens']:,} tokens, {format_duration(wall_seconds)} wall time",
            f"  mean {tokens_per_second:,.0f} tokens/s, MFU {mfu}; {losses}",
            f"  last checkpoint: {last_checkpoint or 'none'}",
            f"  last state:      {last_state or 'none'}",
        ])

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.close()
        if self.metrics_file is not None:
            self._try(f"closing {METRICS_FILE}", self.metrics_file.close)
        if self.tracker is not None:
            self._try(f"closing {self.tracker.report_to}", self.tracker.close)
