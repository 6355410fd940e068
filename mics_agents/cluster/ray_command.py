"""The ``mics run --ray`` command around :class:`.ray_run.RayRun`: the same start-up checks as ``mics run``,
the progress display and summary, the merge, and the exit codes (75 when --batch --no-wait left every shard
waiting on batches in progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_on_ray"]


def _count_items(data: Path) -> int:
    from ..data import parse_record, read_items

    return sum(1 for _ in read_items(data, parse_record))


def run_on_ray(*, data: Path, output: Path, image_dir: Path | None, passed: list[str], address: str | None,
               shards: int | None, budget_usd: float | None, limit: int | None, log_every: float,
               json_summary: Path | None, settings_overrides: dict[str, Any], batch: bool = False,
               no_wait: bool = False) -> int:
    """Run, merge, and return the exit code (as ``mics run``'s)."""
    import json

    from .. import cli
    from ..config import load_settings
    from ..errors import MicsError, OutputBusyError
    from ..outputs import default_failed_path, merge_outputs
    from ..progress import ProgressReporter, summary_table
    from .ray_run import RayRun, check_reachable, import_ray, shards_of_journals

    output = output.resolve()
    try:
        settings = load_settings(**{k: v for k, v in settings_overrides.items() if v is not None})
        settings.check_roles()
        cli._check_start(settings, data, image_dir)
        cli._check_writable_path(json_summary, "--json-summary")
        if batch:  # what each shard's run would refuse, refused once here, before Ray starts
            from ..batches.setup import batch_routes

            batch_routes(settings)
        import_ray()
        found = shards_of_journals(output, shards)
        check_reachable(address)
    except MicsError as exc:
        cli._say("Configuration error", exc)
        return cli.EXIT_CONFIG_ERROR
    if shards is None and found is not None:
        cli.err_console.print(f"[cyan]Ray:[/] resuming the {found} shards beside {output}", soft_wrap=True,
                              highlight=False)
        shards = found
    total = _count_items(data)
    reporter = ProgressReporter(cli.err_console, log_every=log_every)
    runner = RayRun(
        output=output, run_args=passed, total=total if limit is None else min(total, limit * (shards or total)),
        address=address, shards=shards, budget_usd=budget_usd, cpus_per_shard=settings.ray_cpus_per_shard,
        max_retries=settings.ray_max_retries, backup_every=settings.cluster_backup_every, on_update=reporter,
        batch_rerun_every=settings.batch_poll_interval if batch and not no_wait else None,
        on_event=lambda text: cli.err_console.print(f"[cyan]Ray:[/] {text}", soft_wrap=True, highlight=False),
    )
    try:
        stats = runner.run()
    except MicsError as exc:  # Ray would not start or connect
        reporter.close()
        cli._say("Configuration error", exc)
        return cli.EXIT_CONFIG_ERROR
    finally:
        reporter.close()
    cli.err_console.print(summary_table(stats, output=str(output), failed=str(default_failed_path(output))))
    for failure in runner.failed_shards():
        cli._say(f"Shard {failure['index']} stopped", f"exit {failure['exit_code']}: {failure.get('last_line', '')} "
                 f"(its log: {failure.get('log', 'none')})")
    if json_summary is not None:
        json_summary.write_text(json.dumps({**stats.as_dict(), "shards": runner.results}, indent=2) + "\n",
                                encoding="utf-8")
    if runner.failed_shards():
        return 1
    if stats.stop_reason == "budget":
        cli.err_console.print(f"[yellow]Budget of ${budget_usd} reached: every shard stopped. Rerun with a larger "
                              "--budget-usd to continue.[/]")
        return cli.EXIT_BUDGET
    if stats.stop_reason == "waiting":
        cli.err_console.print("[yellow]Batches still in progress at the provider (--no-wait). Rerun the same "
                              "command later (e.g. from cron) to pick up their results and go on.[/]")
        return cli.EXIT_BATCHES_PENDING
    if stats.stop_reason != "completed":
        cli.err_console.print("[yellow]Interrupted: every shard stopped. Rerun the same command to resume.[/]")
        return cli.EXIT_INTERRUPTED
    inputs = [path for path in runner.shard_outputs() if path.is_file() or default_failed_path(path).is_file()]
    for path in inputs:  # a shard whose items all failed has no output file of its own
        path.touch(exist_ok=True)
    try:
        report = merge_outputs(inputs, output)
    except OutputBusyError as exc:
        cli._say("Output in use", exc)
        return cli.EXIT_CONFIG_ERROR
    except MicsError as exc:
        cli._say("Merge refused", exc)
        return 1
    cli.err_console.print(f"Merged {len(inputs)} shards: {report.successes} successes and {report.failures} "
                          f"failures into {output}", soft_wrap=True)
    return 0
