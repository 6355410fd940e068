"""Showing a run's progress: a rich progress bar on a terminal, a plain log line every few seconds
otherwise, and a summary table at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .runner import RunStats

__all__ = ["ProgressReporter", "summary_table", "RunKind", "MICS_RUN", "EVALUATION", "GENERATION"]


@dataclass(frozen=True)
class RunKind:
    """How a batch job speaks of itself: an evaluation's items are *answered* (whether rightly is graded
    afterwards), never a "success" of a MICS run."""

    title: str
    ended_ok: str
    has_no_path: bool = True


MICS_RUN = RunKind("MICS run", "success")
EVALUATION = RunKind("Evaluation", "answered", has_no_path=False)
GENERATION = RunKind("Generation", "success", has_no_path=False)


def _counts(stats: "RunStats", kind: RunKind = MICS_RUN) -> str:
    rate = f"{100 * stats.success / stats.ended:.0f}%" if stats.ended else "-"
    no_path = f"no_path {stats.no_path}, " if kind.has_no_path else ""
    return (
        f"{kind.ended_ok} {stats.success} ({rate}), {no_path}model_error {stats.model_error}, "
        f"bad_input {stats.bad_input}{f', internal_error {stats.internal_error}' if stats.internal_error else ''} | "
        f"calls {stats.calls} ({stats.cached_calls} cached), "
        f"{stats.tokens:,} tokens, ${stats.spent_usd:.4f} spent{_batches(stats.batches)}"
    )


def _batches(batches: dict | None) -> str:
    """A batched run's batches: how many are out, and what their replies cost against online."""
    if not batches:
        return ""
    return (f" | batches {batches['batches_in_progress']} running, {batches['batches_ended']} ended, "
            f"${batches['batch_cost_usd']:.4f} (online ${batches['online_cost_usd']:.4f})")


class ProgressReporter:
    """Call it with the stats after every change; ``close()`` when the run ends."""

    def __init__(self, console: Console, *, log_every: float = 10.0, kind: RunKind = MICS_RUN) -> None:
        self.console = console
        self.kind = kind
        self.log_every = log_every
        self._progress = None
        self._task = None
        self._last_log = 0.0
        self._last_logged: tuple[int, int] | None = None
        self._started = time.monotonic()

    def __call__(self, stats: "RunStats") -> None:
        # While the input is still being counted (beside the first items), how many there are is not known.
        todo = max(0, stats.total - stats.already_done) if stats.counted else None
        if self.console.is_terminal:
            self._update_bar(stats, todo)
        elif todo is not None:  # the first line comes once the count is known
            now = time.monotonic()
            state = (stats.ended, stats.total)
            due = now - self._last_log >= self.log_every or stats.ended == todo
            if due and state != self._last_logged:
                self._last_log, self._last_logged = now, state
                self.console.print(
                    f"[mics] {stats.ended}/{todo} items ({stats.already_done} done before) | {_counts(stats, self.kind)}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )

    def _update_bar(self, stats: "RunStats", todo: int | None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn(f"[bold]{self.kind.title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("", total=todo)
        self._progress.update(self._task, completed=stats.ended, total=todo, description=_counts(stats, self.kind))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_table(stats: "RunStats", *, output: str, failed: str, kind: RunKind = MICS_RUN) -> Table:
    table = Table(title=kind.title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("stopped because", stats.stop_reason),
        ("items in scope", str(stats.total)),
        ("done before this session", str(stats.already_done)),
        (kind.ended_ok, str(stats.success)),
        *([("no_path", str(stats.no_path))] if kind.has_no_path else []),
        ("model_error (retried next run)", str(stats.model_error)),
        ("bad_input", str(stats.bad_input)),
        ("not started", str(stats.remaining)),
        ("model calls", f"{stats.calls} ({stats.cached_calls} from cache)"),
        ("tokens", f"{stats.tokens:,}"),
        ("spent by this run", f"${stats.spent_usd:.4f}"),
        ("elapsed", f"{time.monotonic() - stats.started_at:.1f} s"),
        ("successes", output),
        ("failures", failed),
    ]
    if stats.internal_error:
        rows.insert(7, ("internal_error (a defect: please report; retried next run)", str(stats.internal_error)))
    if stats.no_items:
        rows.insert(7, ("no_items (nothing usable generated)", str(stats.no_items)))
    if stats.records != stats.success:
        rows.insert(3, ("lines written", str(stats.records)))
    if stats.drops:
        rows.append(("dropped", ", ".join(f"{reason} {count}" for reason, count in sorted(stats.drops.items()))))
    if stats.repaired_lines:
        rows.append(("torn lines repaired", str(stats.repaired_lines)))
    if stats.truncated_samples:
        cut = ", ".join(f"{model} {count}" for model, count in sorted(stats.truncated_samples.items()))
        rows.append(("intern replies cut off (counted wrong)", f"{cut}: raise MICS_INTERN_MAX_TOKENS"))
    for name, value in rows:
        table.add_row(name, value)
    return table
