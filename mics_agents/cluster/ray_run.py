"""``mics run --ray``: the shards of one run as Ray tasks, one progress line, one budget, one merge.

Each shard is a task (not an actor): Ray places it, and runs it again (``max_retries``) when its worker or node
died; the new attempt resumes from the shard's journal and restores its cache from the last checkpoint. A small
actor, the board, holds what each shard last reported; the driver sums it into the usual progress display and
budget, counting what a shard spent in former sessions (its ``.spent.json``) until it reports, so a budget spent
already starts no shard. When the budget is spent, or on Ctrl-C, every task is cancelled (``ray.cancel``): each
shard starts no new item, lets those in flight finish and ends; a second Ctrl-C forces them. Each shard also
gets the whole budget, so one that alone spent it stops before its next item without waiting for the driver.
The shard outputs are merged with ``mics merge``'s merge once every shard ended with all its items. A rerun keeps
the shard count its journals were run with.

With ``--batch`` each shard's batch ledger lies beside its journal (held by its run alone, without WAL's shared
memory: see ``store.py``), its task runs it again while all its items wait on batches in progress, and what its
open batches are counted at (money committed, not yet billed) counts against the budget with what it spent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runner import RunStats
from .shard_task import EXIT_BATCHES_PENDING, FAILURE_KINDS, ShardJob, read_committed, read_spent, run_shard, shard_output

__all__ = ["RayRun", "check_reachable", "forwarded_environment", "import_ray", "shards_of_journals"]

# The driver's variables a shard's run needs on another node: its settings, and the providers' keys and URLs.
_FORWARDED_PREFIXES = ("MICS_", "LITELLM_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "HOSTED_VLLM_", "AZURE_", "VERTEX")
_FORWARDED_SUFFIXES = ("_API_KEY", "_API_BASE", "_BASE_URL")
_WAIT_S = 0.5


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the ray package: pip install 'mics-agents[ray]'") from None
    return ray


def check_reachable(address: str | None, *, timeout: float = 10.0) -> None:
    """Refuse, in one line, a cluster address nothing answers at: ``ray.init`` would wait for it for minutes,
    printing warnings. ``address`` as given (else ``RAY_ADDRESS``); ``auto``, ``local`` and none are Ray's."""
    import socket

    target = address or os.environ.get("RAY_ADDRESS") or ""
    if target in ("", "auto", "local"):
        return
    place = target.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = place.rpartition(":")
    if not host or not port.isdigit():
        return  # Ray's own message says what is wrong with it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        given = "--ray" if address else "RAY_ADDRESS"
        raise ConfigError(f"nothing answers at the Ray cluster {target} ({exc.strerror or exc}): check {given}, or "
                          "start Ray there (ray start --head)") from None


def shards_of_journals(output: Path, requested: int | None) -> int | None:
    """The shard count of the journals a former run left beside ``output`` (``OUT.shard-I-of-N``), which a rerun
    must keep: with another N every item would belong to a shard without a journal or cache and be searched, and
    paid for, again (a cluster that grew or shrank changes the default count). None when there are none."""
    import re

    stem = output.name.removesuffix(".jsonl")
    pattern = re.compile(re.escape(stem) + r"\.shard-\d+-of-(\d+)(?:_failed)?\.jsonl")
    counts = sorted({int(match.group(1)) for path in output.parent.glob(f"{stem}.shard-*-of-*.jsonl")
                     if (match := pattern.fullmatch(path.name))})
    if len(counts) > 1:
        raise ConfigError(f"the journals beside {output} are of runs with {' and '.join(map(str, counts))} shards; "
                          f"keep one set (merge the other with mics merge first, or move it away) and rerun")
    if counts and requested is not None and requested != counts[0]:
        raise ConfigError(f"--shards {requested}: the journals beside {output} are of {counts[0]} shards; rerun with "
                          f"--shards {counts[0]} (another count would search their items again)")
    return counts[0] if counts else None


def forwarded_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    return {name: value for name, value in environ.items()
            if name.startswith(_FORWARDED_PREFIXES) or name.endswith(_FORWARDED_SUFFIXES)}


class _Board:
    """What each shard reported last (counts since its attempt started, its spend and what its open batches are
    counted at), and, under a budget, the batches it granted: an actor answers one call at a time, so two
    shards asking at the same moment are answered one after the other, the second counting the first's grant."""

    def __init__(self, budget_usd: float | None = None, before: dict[int, float] | None = None) -> None:
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.budget_usd = budget_usd
        self.before = dict(before or {})  # what each shard spent and committed in former sessions
        self.claims: dict[int, float] = {}  # what each shard had spent and committed at its last grant, with it

    def report(self, index: int, snapshot: dict[str, Any]) -> None:
        self.snapshots[index] = snapshot

    def _counted(self, index: int) -> float:
        snapshot = self.snapshots.get(index)
        reported = (float(snapshot.get("spent_usd", 0.0)) + float(snapshot.get("committed_usd", 0.0))
                    if snapshot is not None else self.before.get(index, 0.0))
        return max(reported, self.claims.get(index, 0.0))

    def reserve(self, index: int, own: float, estimate: float) -> bool:
        """May shard ``index``, having spent and committed ``own``, submit a batch counted at ``estimate``?"""
        if self.budget_usd is None:
            return True
        others = sum(self._counted(shard) for shard in set(self.snapshots) | set(self.before) | set(self.claims)
                     if shard != index)
        if others + own + estimate > self.budget_usd:
            return False
        self.claims[index] = own + estimate
        return True

    def read(self) -> dict[int, dict[str, Any]]:
        return self.snapshots


def _add_counts(stats: RunStats, counts: dict[str, Any]) -> None:
    for name in ("success", *FAILURE_KINDS, "calls", "cached_calls", "already_done"):
        setattr(stats, name, getattr(stats, name) + int(counts.get(name, 0)))
    stats.tokens += int(counts.get("input_tokens", 0)) + int(counts.get("output_tokens", 0)) + int(counts.get("tokens", 0))
    stats.cost_usd += float(counts.get("cost_usd", 0.0))
    stats.spent_usd += float(counts.get("spent_usd", 0.0))


@dataclass
class RayRun:
    """One driver. ``run_args``: the ``mics run`` arguments every shard shares (absolute paths, no --output,
    --shard, --cache, --budget-usd or --json-summary)."""

    output: Path
    run_args: list[str]
    total: int
    address: str | None = None
    shards: int | None = None
    budget_usd: float | None = None
    cpus_per_shard: float = 1.0
    max_retries: int = 3
    backup_every: float = 60.0
    # Seconds a shard's task waits for its output's lock; None: settings.cluster_lock_wait.
    lock_wait: float | None = None
    # --batch: seconds between a shard's runs while all its items wait on batches (None: the user's --no-wait,
    # each shard exits 75 then, and so does the run).
    batch_rerun_every: float | None = None
    on_update: Callable[[RunStats], None] = lambda stats: None
    on_event: Callable[[str], None] = lambda text: None
    stats: RunStats = field(default_factory=RunStats)
    results: list[dict[str, Any]] = field(default_factory=list)
    _spent_before: dict[int, float] = field(default_factory=dict)
    # --batch: what the shards' open batches are counted at (money committed, not yet billed), which counts
    # against the budget with what they spent.
    committed_usd: float = 0.0
    _committed_before: dict[int, float] = field(default_factory=dict)

    def run(self) -> RunStats:
        ray = import_ray()
        try:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster at "auto", a bad address
            text = " ".join(str(exc).split())[:300]
            raise ConfigError(f"could not connect to Ray ({self.address or 'RAY_ADDRESS, else a local Ray'}): "
                              f"{text}") from None
        try:
            return self._run(ray)
        finally:
            ray.shutdown()

    def shard_outputs(self) -> list[Path]:
        return [shard_output(self.output, index, self.shards or 1) for index in range(self.shards or 1)]

    def _run(self, ray: Any) -> RunStats:
        if self.shards is None:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            self.shards = max(1, int(cpus // self.cpus_per_shard))
        task = ray.remote(num_cpus=self.cpus_per_shard, max_retries=self.max_retries)(run_shard)
        environment = forwarded_environment(os.environ)
        if self.lock_wait is None:
            from ..config import load_settings

            self.lock_wait = load_settings().cluster_lock_wait
        # A shard that alone spent the whole budget stops itself before its next item, without waiting for the
        # driver to see it (the budget is the whole run's: a run of one shard stops exactly as mics run does).
        shared = [*self.run_args, "--budget-usd", repr(self.budget_usd)] if self.budget_usd is not None else self.run_args
        # What each shard spent in former sessions counts until it reports (a shard waiting for a CPU does not).
        self._spent_before = {index: read_spent(path) for index, path in enumerate(self.shard_outputs())}
        self._committed_before = {index: read_committed(path) for index, path in enumerate(self.shard_outputs())}
        if (self.budget_usd is not None
                and sum(self._spent_before.values()) + sum(self._committed_before.values()) >= self.budget_usd):
            self._update({})
            self.stats.stop_reason = "budget"
            self.on_event(f"the budget of ${self.budget_usd:g} was spent by former sessions "
                          f"(${self.stats.spent_usd:.4f}{self._committed_words()}): no shard starts")
            self._final()
            return self.stats
        board = ray.remote(num_cpus=0)(_Board).remote(self.budget_usd, {
            index: self._spent_before[index] + self._committed_before[index] for index in self._spent_before})
        gate = self.budget_usd is not None and "--batch" in self.run_args
        refs = [task.remote(ShardJob(index, self.shards, path, shared, environment, self.backup_every,
                                     self.lock_wait, self.batch_rerun_every, gate), board)
                for index, path in enumerate(self.shard_outputs())]
        self.on_event(f"{self.shards} shards on Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
                      f"{self.cpus_per_shard:g} per shard); journals beside {self.output}")
        pending = list(refs)
        cancelled_once = False
        while pending:
            try:
                if self.stats.stop_reason != "completed" and not cancelled_once:
                    for ref in pending:
                        ray.cancel(ref)
                    cancelled_once = True
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=_WAIT_S)
                snapshots = ray.get(board.read.remote())
                self._update(snapshots)
                refused = any(snapshot.get("budget_refused") for snapshot in snapshots.values())
                if (self.budget_usd is not None and self.stats.stop_reason == "completed"
                        and (refused or self.stats.spent_usd + self.committed_usd >= self.budget_usd)):
                    self.stats.stop_reason = "budget"
                    why = "a shard's next batch would pass it" if refused else "it is spent"
                    self.on_event(f"the budget of ${self.budget_usd:g} is reached: {why} (${self.stats.spent_usd:.4f} "
                                  f"spent so far{self._committed_words()}): stopping every shard; items in flight "
                                  "finish")
                    for ref in pending:
                        ray.cancel(ref)
                    cancelled_once = True
            except KeyboardInterrupt:
                if cancelled_once:
                    self.on_event("second interrupt: aborting the shards; rerun the same command to resume")
                    for ref in pending:
                        ray.cancel(ref, force=True)
                else:
                    self.on_event("stopping: no shard starts a new item; items in flight finish. Interrupt again to abort.")
                self.stats.stop_reason = "interrupted"
        self.results = [self._result(ray, ref, index) for index, ref in enumerate(refs)]
        self._final()
        return self.stats

    def _update(self, snapshots: dict[int, dict[str, Any]]) -> None:
        stats = RunStats(total=self.total, started_at=self.stats.started_at, stop_reason=self.stats.stop_reason)
        for snapshot in snapshots.values():
            _add_counts(stats, snapshot)
        stats.spent_usd += sum(spent for index, spent in self._spent_before.items() if index not in snapshots)
        self.committed_usd = sum(float(snapshot.get("committed_usd", 0.0)) for snapshot in snapshots.values()) + sum(
            committed for index, committed in self._committed_before.items() if index not in snapshots)
        self.stats = stats
        self.on_update(stats)

    @staticmethod
    def _result(ray: Any, ref: Any, index: int) -> dict[str, Any]:
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return {"index": index, "exit_code": 130, "cancelled": True}
        except ray.exceptions.RayError as exc:  # retries spent, or the task failed
            text = " ".join(str(exc).split())[:300]
            return {"index": index, "exit_code": 1, "last_line": f"the task failed on Ray: {text}"}

    def _final(self) -> None:
        """The summary from the shards' own summaries, where each ended with one."""
        stats = RunStats(total=self.total, started_at=self.stats.started_at, stop_reason=self.stats.stop_reason)
        summarized = {result["index"] for result in self.results if result.get("summary") is not None}
        stats.spent_usd = sum(spent for index, spent in self._spent_before.items() if index not in summarized)
        for result in self.results:
            summary = result.get("summary")
            if summary is None:
                continue
            _add_counts(stats, {**summary, "already_done": summary.get("already_done", 0)})
            stats.no_items += int(summary.get("no_items", 0))
            stats.records += int(summary.get("records", 0))
        codes = {result["exit_code"] for result in self.results}
        if codes == {0}:  # a stop that came after every shard had scheduled its last item stopped nothing
            stats.stop_reason = "completed"
        elif stats.stop_reason == "completed" and EXIT_BATCHES_PENDING in codes and codes <= {0, EXIT_BATCHES_PENDING}:
            stats.stop_reason = "waiting"  # --no-wait: shards whose items all wait on batches in progress
        elif stats.stop_reason == "completed":
            stats.stop_reason = "budget" if codes <= {0, 3, EXIT_BATCHES_PENDING} else "interrupted"
        self.stats = stats

    def failed_shards(self) -> list[dict[str, Any]]:
        return [result for result in self.results if result["exit_code"] not in (0, 3, 130, EXIT_BATCHES_PENDING)]

    def _committed_words(self) -> str:
        return f", and ${self.committed_usd:.4f} in batches still open" if self.committed_usd else ""
