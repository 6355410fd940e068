"""The ``mics`` command line. Heavy imports (LiteLLM, the search) happen inside commands, so
``mics --help`` stays fast."""

from __future__ import annotations

import asyncio
import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .redact import ScrubbingWriter

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .config import Settings
    from .outputs import OutputLock
    from .progress import RunKind
    from .results import SearchResult
    from .runner import RunOptions, RunStats, Worker
    from .search import Searcher

app = typer.Typer(
    name="mics",
    help="Mentor-Intern Collaborative Search: verified step-by-step medical reasoning data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Everything printed goes through the secret scrubber: a provider's error may echo the API key.
console = Console(file=ScrubbingWriter(lambda: sys.stdout))  # type: ignore[arg-type]
err_console = Console(file=ScrubbingWriter(lambda: sys.stderr), stderr=True)  # type: ignore[arg-type]

EXIT_CONFIG_ERROR = 2
EXIT_BUDGET = 3
EXIT_INTERRUPTED = 130
EXIT_BATCHES_PENDING = 75  # --no-wait: provider batches still in progress; rerun later (EX_TEMPFAIL)
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def _say(label: str, message: object, *, colour: str = "bold red") -> None:
    """One line on stderr, with every secret masked (a provider's error may echo the API key)."""
    from .redact import scrub

    text = " ".join(scrub(str(message)).split())
    err_console.print(f"[{colour}]{label}:[/] {escape(text)}", soft_wrap=True)


def _fail_config(message: str) -> typer.Exit:
    _say("Configuration error", message)
    return typer.Exit(EXIT_CONFIG_ERROR)


class _StartFailed(Exception):
    """A run could not start (its worker or its output could not be opened): exit 2, with what to do, the
    cause's message under ``label``."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


def _print_result(result: "SearchResult", *, show_reasoning: bool) -> None:
    from rich.panel import Panel

    colour = {"success": "green", "no_path": "yellow", "model_error": "red"}[result.status]
    summary = f"[{colour}]{result.status}[/]"
    if result.ok:
        summary += (
            f"  search_id={result.search_id}  depth={result.final_depth}  mics_score={result.mics_score:.2f}"
            f"  trend={result.trend}  path={' -> '.join(result.generated_by)}"
        )
    else:
        from .redact import scrub

        summary += f"  {escape(scrub(result.message))}"
    usage = result.usage
    summary += f"\n[dim]{usage.calls} calls ({usage.cached_calls} cached), {usage.input_tokens + usage.output_tokens} tokens, ${usage.cost_usd:.4f}[/]"
    console.print(Panel(summary, title=result.rid, title_align="left"))
    if show_reasoning and result.reasoning:
        console.print(result.reasoning, markup=False, highlight=False)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Where to write the records (JSONL).")] = Path("mics_demo_output.jsonl"),
    cache: Annotated[
        Optional[str], typer.Option(help="SQLite cache; a rerun replays every call from it ('' for none).")
    ] = "mics_demo_cache.sqlite",
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
) -> None:
    """Run the whole pipeline offline on the example cases that ship with mics-agents, with SIMULATED models."""
    from .config import load_settings
    from .models.simulated import simulated_intern, simulated_judge, simulated_mentor
    from .runner import RunOptions, run_id_for
    from .search import Searcher
    from .store import Store

    console.print(
        "[bold yellow]SIMULATED MODELS[/]: the mentors, interns and judge below are offline stand-ins "
        "that imitate model behaviour. Their reasoning is a template, not medicine."
    )
    settings = load_settings(seed=seed, cache_path=cache, mentors=[], interns=[], judge="")
    options = RunOptions(data=EXAMPLES_DIR / "cases.jsonl", output=output, image_dir=EXAMPLES_DIR / "images")

    async def open_searcher() -> Searcher:
        return Searcher(
            mentors=[simulated_mentor("simulated/mentor-a"), simulated_mentor("simulated/mentor-b")],
            interns=[simulated_intern("simulated/intern-1"), simulated_intern("simulated/intern-2")],
            judge=simulated_judge(),
            settings=settings,
            store=await Store.open(settings.cache_path) if settings.cache_path else None,
            owns_store=True,
            run_id=run_id_for(output),
        )

    # The demo starts its output afresh each time; its calls replay from the cache.
    stats = _run_batch(open_searcher, options, settings, fresh=True)
    first = output.read_bytes().split(b"\n")[:1] if output.exists() and output.stat().st_size else []
    if first:
        record = json.loads(first[0])
        console.print(f"\n[bold]{record['rid']}[/] (mentors {' -> '.join(record['generated_by'])}):")
        console.print(record["reasoning"], markup=False, highlight=False)
    if stats.stop_reason == "completed":
        from .dataset import BuildOptions, build_dataset, default_recipe

        dataset_dir = output.with_name(output.stem + "_dataset")
        report = build_dataset(BuildOptions(
            mics=[output], cases=options.data, image_dir=EXAMPLES_DIR / "images", output=dataset_dir,
            recipe=default_recipe(), seed=seed,
        ))
        stages = ", ".join(f"{stage} {count}" for stage, count in report.stages.items())
        console.print(f"\nCurriculum (no text QA or general VQA in the demo): {stages} samples -> {dataset_dir}/")
        console.print(f"Step data: {report.step_rows} step rows and {report.step_pairs} preference pairs "
                      f"-> {dataset_dir / 'steps'}/", soft_wrap=True)
    console.print(
        "\nTo use real models, set e.g.\n"
        "  export MICS_MENTORS=openai/gpt-4o,gemini/gemini-2.5-pro MICS_INTERNS=hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct\n"
        "  export MICS_JUDGE=openai/gpt-4o-mini OPENAI_API_KEY=... GEMINI_API_KEY=... HOSTED_VLLM_API_BASE=http://localhost:8000/v1\n"
        "and run: mics run cases.jsonl --image-dir images/ --output mics.jsonl",
        soft_wrap=True,
    )
    raise typer.Exit(_exit_code(stats))


def _exit_code(stats: "RunStats") -> int:
    return {"completed": 0, "budget": EXIT_BUDGET, "interrupted": EXIT_INTERRUPTED,
            "waiting": EXIT_BATCHES_PENDING}[stats.stop_reason]


def _search_settings(settings: "Settings") -> dict:
    """The settings that shape search results, recorded per run to warn when a resume changes them:
    models, search knobs, what interns are asked (mode and prompt versions), image sizes, the strategy."""
    from .agents import INTERN_TEMPLATES
    from .prompts import load_prompt

    keys = ("strategy", "mentors", "interns", "judge", "max_depth", "initial_steps", "intern_temperatures",
            "samples_per_temperature", "mentor_temperature", "judge_temperature", "seed", "intern_mode",
            "mentor_image_max_side", "image_max_side", "mentor_max_tokens", "intern_max_tokens", "path_opening",
            "mentor_images_first", "intern_answer_line", "intern_image_min_pixels", "intern_image_max_pixels",
            "judge_max_tokens")
    recorded = {key: getattr(settings, key) for key in keys}
    if settings.strategy == "vanilla":
        recorded["vanilla_mentor"] = settings.search_mentors[0]
    templates = ("mentor", INTERN_TEMPLATES[settings.intern_mode], "judge")
    recorded["prompt_versions"] = {name: load_prompt(name, settings.prompt_dir).version for name in templates}
    return recorded


def _check_start(settings: "Settings", data: Path | None = None, image_dir: Path | None = None) -> None:
    """What a run checks before it imports LiteLLM or opens anything (the settings were checked as they
    loaded: ranges, MICS_PROMPT_DIR and its templates, the Router YAML): the input file, the image folder
    and the cache file. Raises :class:`MicsError` saying what to fix."""
    from .errors import ConfigError
    from .store import check_cache_file

    if data is not None:
        if not data.exists():
            raise ConfigError(f"input file {str(data)!r} not found")
        if not data.is_file():
            raise ConfigError(f"input {str(data)!r} is not a file; give a JSONL file, one case per line")
        try:
            with open(data, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"input file {str(data)!r} cannot be read: {exc.strerror or exc}") from None
    if image_dir is not None and not image_dir.is_dir():
        # Else every item would end bad_input, one by one, for a typo in one option.
        raise ConfigError(f"--image-dir {str(image_dir)!r} is not a folder; give the folder the input's image "
                          "paths are relative to")
    check_cache_file(settings.cache_path)


def _check_writable_path(path: Path | None, option: str) -> None:
    """Refuse, before any work, a file the command would write at its end that cannot be written there: a
    folder, a device, a folder that does not exist."""
    from .errors import ConfigError

    if path is None:
        return
    if path.exists() and not path.is_file():
        raise ConfigError(f"{option} {str(path)!r} is not a regular file (a folder or a device); give a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: the folder {str(path.parent)!r} does not exist")


def _run_batch(open_worker: "Callable[[], Awaitable[Worker | Searcher]]", options: "RunOptions", settings: "Settings", *, log_every: float = 10.0, json_summary: Optional[Path] = None, fresh: bool = False, group_key: str | None = None, kind: "RunKind | None" = None) -> "RunStats":
    """Run a batch with progress, Ctrl-C handling (first: finish items in flight; second: abort) and a summary.

    Start-up, in order, each failure exiting 2 with one line, nothing left open and no file created: the
    output's paths checked (a device or folder is refused) and its lock probed (a run owning it refuses this
    one at once), the output files read back (files we did not write are refused), the worker opened
    (LiteLLM imported, keys checked, the cache connected). Only then is the lock taken (its file, once made,
    stays) and are the files repaired. ``fresh``: start the files afresh (the demo). ``group_key``: the
    worker's (see OutputFiles)."""
    from .errors import MicsError, OutputBusyError
    from .outputs import OutputFiles, OutputLock

    try:
        files = OutputFiles(options.output, options.failed, group_key=group_key)
        lock = OutputLock(files.output, files.failed)  # the failed file is a journal too: one owner each
        lock.probe()
        inspection = files.inspect()  # even when starting afresh: a file that is not ours is never deleted
    except OutputBusyError as exc:
        _say("Output in use", exc)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    except MicsError as exc:
        _say("Output refused", exc)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    except OSError as exc:
        _say("Output refused", f"{exc.filename or options.output}: {exc.strerror or exc}")
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    try:
        return _run_owned_batch(open_worker, options, settings, lock, files, inspection, fresh=fresh,
                                log_every=log_every, json_summary=json_summary, kind=kind)
    except _StartFailed as exc:
        _say(exc.label, exc.__cause__ or exc)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    finally:
        lock.release()


def _take_output(lock: "OutputLock", files: Any, inspection: Any, *, retry_failed: bool, fresh: bool) -> Any:
    """Take the output's lock and repair and read back its files (blocking); what stops this is a start-up
    failure (:class:`_StartFailed`)."""
    from .errors import MicsError, OutputBusyError

    try:
        lock.acquire()  # another run may have taken it since the probe
    except OutputBusyError as exc:
        raise _StartFailed("Output in use") from exc
    except MicsError as exc:
        raise _StartFailed("Cannot start") from exc
    try:
        if fresh:
            for path in (files.output, files.failed):
                path.unlink(missing_ok=True)
        resume = files.prepare(retry_failed=retry_failed, inspection=inspection)
    except MicsError as exc:
        raise _StartFailed("Output refused") from exc
    except OSError as exc:
        raise _StartFailed("Output refused") from MicsError(f"{exc.filename or files.output}: {exc.strerror or exc}")
    if resume.older_grader:
        from .grading import GRADER_VERSION

        _say("Note", f"{resume.older_grader} finished records of {files.output} were graded by an older "
             f"grader than this one (v{GRADER_VERSION}); their scores stand as they were, since only a new "
             "search could change them. To redo them, move their lines out of the output and rerun.",
             colour="yellow")
    return resume


def _run_owned_batch(open_worker: "Callable[[], Awaitable[Worker | Searcher]]", options: "RunOptions", settings: "Settings", lock: "OutputLock", files: Any, inspection: Any, *, fresh: bool, log_every: float, json_summary: Optional[Path], kind: "RunKind | None" = None) -> "RunStats":
    import signal

    from .errors import MicsError, StoreError
    from .progress import MICS_RUN, ProgressReporter, summary_table
    from .runner import BatchRun

    kind = kind or MICS_RUN
    reporter = ProgressReporter(err_console, log_every=log_every, kind=kind)

    async def execute() -> "RunStats":
        try:
            worker = await open_worker()
        except MicsError as exc:  # whatever it opened, it closed
            raise _StartFailed("Cannot start") from exc
        try:
            resume = await asyncio.to_thread(_take_output, lock, files, inspection,
                                             retry_failed=options.retry_failed, fresh=fresh)
            batch = BatchRun(worker, options, on_update=reporter, output_lock=lock, resume=resume)
        except BaseException:
            await worker.aclose()
            raise
        try:
            store = batch.worker.store
            if store is not None:
                current = _search_settings(settings)
                try:
                    previous = await store.record_run(batch.run_id, str(options.data), str(options.output), current)
                except StoreError as exc:  # what the run records of itself; its calls and lines do not depend on it
                    _say("Warning", f"{exc} The run goes on; only the note on changed settings is skipped.",
                         colour="yellow")
                    previous = None
                changed = {k: (previous[k], v) for k, v in current.items() if previous and previous.get(k) != v}
                if changed:
                    details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
                    err_console.print(f"[yellow]Note:[/] this run's search settings changed since its last session ({details}); items already done keep the old ones.")
            loop = asyncio.get_running_loop()
            main_task = asyncio.current_task()

            def on_signal() -> None:
                if batch.stopping:
                    err_console.print("[red]Second interrupt: aborting. Rerun the same command to resume.[/]")
                    main_task.cancel()
                else:
                    err_console.print("[yellow]Stopping: no new items start; items in flight finish. Interrupt again to abort.[/]")
                    batch.stop("interrupted")

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
            try:
                return await batch.run()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        finally:
            await batch.worker.aclose()

    try:
        stats = asyncio.run(execute())
    except asyncio.CancelledError:
        reporter.close()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        reporter.close()
    from .outputs import default_failed_path

    failed = options.failed or default_failed_path(options.output)
    err_console.print(summary_table(stats, output=str(options.output), failed=str(failed), kind=kind))
    if stats.batches is not None:
        err_console.print(_batch_summary(stats.batches), soft_wrap=True)
    if stats.stop_reason == "budget":
        err_console.print(f"[yellow]Budget of ${options.budget_usd} reached: no new items started. Rerun with a larger --budget-usd to continue.[/]")
    elif stats.stop_reason == "interrupted":
        err_console.print("[yellow]Interrupted. Rerun the same command to resume.[/]")
    elif stats.stop_reason == "waiting":
        err_console.print("[yellow]Batches still in progress at the provider. Rerun the same command later (e.g. "
                          "from cron) to pick up their results and go on.[/]")
    if json_summary is not None:
        json_summary.write_text(json.dumps(stats.as_dict(), indent=2) + "\n", encoding="utf-8")
    return stats


def _batch_command(
    open_worker: "Callable[[Settings], Awaitable[Worker | Searcher]]",
    settings_overrides: dict,
    *,
    data: Path,
    shard: str,
    check_roles: bool,
    log_every: float,
    json_summary: Optional[Path],
    group_key: str | None = None,
    kind: "RunKind | None" = None,
    **option_values: object,
) -> None:
    """What mics run and mics generate share: settings and options from the flags, the batch, exit codes."""
    from .config import load_settings
    from .data import parse_shard
    from .errors import ConfigError, MicsError
    from .runner import RunOptions

    try:
        settings = load_settings(**{k: v for k, v in settings_overrides.items() if v is not None})
        if check_roles:
            settings.check_roles()
        shard_index = parse_shard(shard)
        _check_start(settings, data, option_values.get("image_dir"))  # type: ignore[arg-type]
        _check_writable_path(json_summary, "--json-summary")
    except (MicsError, ValueError) as exc:
        raise _fail_config(str(exc)) from None
    options = RunOptions(data=data, shard=shard_index, **option_values)  # type: ignore[arg-type]
    try:
        stats = _run_batch(lambda: open_worker(settings), options, settings, log_every=log_every,
                           json_summary=json_summary, group_key=group_key, kind=kind)
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    except MicsError as exc:
        _say("Run stopped", exc)
        raise typer.Exit(1) from None
    raise typer.Exit(_exit_code(stats))


def _batch_summary(batches: dict) -> str:
    """One paragraph on a batched run's batches: how many, how big, and their cost against online."""
    saved = batches["online_cost_usd"] - batches["batch_cost_usd"]
    return (
        f"Batches: {batches['batches_submitted']} submitted ({batches['requests_submitted']} requests, "
        f"{batches['requests_per_batch']} per batch), {batches['batches_reattached']} re-attached, "
        f"{batches['batches_ended']} ended, {batches['batches_in_progress']} still in progress; "
        f"{batches['replies']} replies cost ${batches['batch_cost_usd']:.4f} at the batch rate against "
        f"${batches['online_cost_usd']:.4f} online (${saved:.4f} saved); {batches['failed_requests']} requests "
        f"failed in a batch, {batches['retried_in_a_later_batch']} retried in a later one, "
        f"{batches['asked_online_instead']} asked online instead; longest batch {batches['longest_batch_s']:g} s."
    )


class StrategyChoice(str, Enum):
    mics = "mics"
    vanilla = "vanilla"


from .cluster.ray_option import RunCommand  # noqa: E402  (--ray [ADDRESS]: see its docstring)


@app.command(cls=RunCommand)
def run(
    data: Annotated[Path, typer.Argument(help="Cases, one JSON object per line (Chiron-o1 or plain layout).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Successes, one Chiron-o1 record per line.")],
    image_dir: Annotated[Optional[Path], typer.Option(help="Folder the image paths are relative to (default: the data file's folder).")] = None,
    failed: Annotated[Optional[Path], typer.Option(help="Failures (default: OUTPUT with _failed.jsonl).")] = None,
    cache: Annotated[Optional[str], typer.Option(help="SQLite cache file (default: MICS_CACHE_PATH; '' for none).")] = None,
    concurrency: Annotated[Optional[int], typer.Option(min=1, help="Items in flight (default: 8; with --batch, "
                                                       "MICS_BATCH_ITEMS_IN_FLIGHT).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N items (of this shard).")] = None,
    shard: Annotated[str, typer.Option(help="I/N: take shard I of N, by a hash of the item id; auto: from a Slurm "
                                       "job array (SLURM_ARRAY_TASK_*) or RANK/WORLD_SIZE.")] = "0/1",
    max_depth: Annotated[Optional[int], typer.Option(min=1, help="Search iterations (default: MICS_MAX_DEPTH).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Run seed (default: MICS_SEED).")] = None,
    budget_usd: Annotated[Optional[float], typer.Option(min=0, help="Start no new item once this run has spent this much.")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Also redo no_path and bad_input items.")] = False,
    router_config: Annotated[Optional[Path], typer.Option(help="LiteLLM Router config (default: MICS_ROUTER_CONFIG).")] = None,
    json_summary: Annotated[Optional[Path], typer.Option(help="Also write the summary as JSON here.")] = None,
    log_every: Annotated[float, typer.Option(help="Seconds between log lines when not on a terminal.")] = 10.0,
    strategy: Annotated[Optional[StrategyChoice], typer.Option(help="mics: the search; vanilla: one mentor's whole "
                                                            "solution, scored once (default: MICS_STRATEGY).")] = None,
    vanilla_mentor: Annotated[Optional[str], typer.Option(help="The vanilla strategy's mentor (default: "
                                                          "MICS_VANILLA_MENTOR, else the first mentor).")] = None,
    batch: Annotated[bool, typer.Option("--batch", help="Send the calls of MICS_BATCH_MODELS through their provider's "
                                        "batch API (half price; rounds take minutes to hours).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="With --batch: exit (75) once every item waits on a "
                                          "batch in progress; rerun later to go on.")] = False,
    resubmit_canceled: Annotated[bool, typer.Option(help="With --batch: send again the requests of a batch that "
                                                    "was cancelled.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="[ADDRESS]", show_default=False,
                                               help="Run the shards as Ray tasks, then merge them: on ADDRESS (as "
                                               "ray.init(address=...) takes it: auto, HOST:PORT, ray://HEAD:10001), "
                                               "else RAY_ADDRESS, else a local Ray.")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="The same as --ray ADDRESS.")] = None,
    shards: Annotated[Optional[int], typer.Option(min=1, help="With --ray: how many shards (default: the cluster's "
                                                  "CPUs / MICS_RAY_CPUS_PER_SHARD).")] = None,
) -> None:
    """Run MICS over a JSONL dataset; rerun the same command to resume.

    Exit 0 when every item ended, 2 on a configuration error or when another run owns the output, 3 when
    the budget stopped it, 75 when --no-wait left batches in progress, 130 when interrupted.
    """
    from .runner import run_id_for
    from .search import Searcher

    if (no_wait or resubmit_canceled) and not batch:
        raise _fail_config("--no-wait and --resubmit-canceled go with --batch")
    if ray is not None or ray_address is not None:
        if ray and ray_address and ray != ray_address:
            raise _fail_config(f"--ray {ray} and --ray-address {ray_address} name two clusters; give one")
        ray_address = ray or ray_address or None
    elif shards is not None:
        raise _fail_config("--shards goes with --ray; without Ray, run each shard with --shard I/N (or auto)")
    if ray is not None or ray_address is not None:
        if failed is not None or shard != "0/1":
            raise _fail_config("--ray runs its own shards, each with its failed file beside its journal, and does "
                               "not take --failed or --shard")
        passed: list[str] = [str(data.resolve())]
        for flag, value in (("--image-dir", image_dir and image_dir.resolve()), ("--concurrency", concurrency),
                            ("--limit", limit), ("--max-depth", max_depth), ("--seed", seed),
                            ("--router-config", router_config and router_config.resolve()),
                            ("--strategy", strategy.value if strategy else None),
                            ("--vanilla-mentor", vanilla_mentor), ("--log-every", log_every)):
            if value is not None:
                passed += [flag, str(value)]
        if retry_failed:
            passed.append("--retry-failed")
        # --batch: each shard's ledger beside its journal (held by its run alone: no -shm file on the shared
        # storage); its task keeps the shard going while its items wait on batches, unless --no-wait.
        passed += [flag for flag, given in (("--batch", batch), ("--no-wait", no_wait),
                                            ("--resubmit-canceled", resubmit_canceled)) if given]
        from .cluster.ray_command import run_on_ray

        settings_overrides = {"max_depth": max_depth, "seed": seed, "router_config": router_config,
                              "strategy": strategy.value if strategy else None, "vanilla_mentor": vanilla_mentor}
        raise typer.Exit(run_on_ray(data=data, output=output, image_dir=image_dir, passed=passed, address=ray_address,
                                    shards=shards, budget_usd=budget_usd, limit=limit, log_every=log_every,
                                    json_summary=json_summary, settings_overrides=settings_overrides,
                                    batch=batch, no_wait=no_wait))

    async def open_searcher(settings: "Settings") -> Any:
        if batch:
            from .batches import open_batch_worker

            return await open_batch_worker(
                settings, run_id=run_id_for(output), output=output, no_wait=no_wait,
                resubmit_canceled=resubmit_canceled,
                on_event=lambda text: err_console.print(f"[cyan]Batch:[/] {text}", soft_wrap=True, highlight=False),
            )
        return await Searcher.open(settings, run_id=run_id_for(output))

    if concurrency is None:
        concurrency = 8
        if batch:
            from .config import load_settings
            from .errors import MicsError

            try:
                concurrency = load_settings().batch_items_in_flight
            except MicsError as exc:
                raise _fail_config(str(exc)) from None

    _batch_command(
        open_searcher,
        {"max_depth": max_depth, "seed": seed, "cache_path": cache, "router_config": router_config,
         "strategy": strategy.value if strategy else None, "vanilla_mentor": vanilla_mentor},
        data=data, shard=shard, check_roles=True, log_every=log_every, json_summary=json_summary,
        output=output, image_dir=image_dir, failed=failed, concurrency=concurrency, limit=limit,
        retry_failed=retry_failed, budget_usd=budget_usd,
    )


@app.command()
def merge(
    inputs: Annotated[list[Path], typer.Argument(help="Shard outputs (their _failed files are joined too).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged successes (failures beside it).")],
    dedupe: Annotated[bool, typer.Option(help="Keep one line per item when shards overlap.")] = False,
) -> None:
    """Join the outputs of shards; refuses overlapping items unless --dedupe."""
    from .errors import MicsError, OutputBusyError
    from .outputs import merge_outputs

    try:
        report = merge_outputs(inputs, output, dedupe=dedupe)
    except OutputBusyError as exc:
        err_console.print(f"[bold red]Output in use:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    except MicsError as exc:
        err_console.print(f"[bold red]Merge refused:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"Merged {report.successes} successes and {report.failures} failures into {output}"
                  + (f" ({report.overlaps} overlapping lines dropped)" if report.overlaps else ""))


@app.command("search")
def search_command(
    question: Annotated[str, typer.Argument(help="The case's question (with options, if multiple choice).")],
    answer: Annotated[str, typer.Option(help="The ground-truth answer.")],
    image: Annotated[Optional[list[Path]], typer.Option(help="An image of the case; repeat for several.")] = None,
    case_info: Annotated[Optional[str], typer.Option(help="Case record text (presentation, findings).")] = None,
    rid: Annotated[Optional[str], typer.Option(help="Item id (fixes the random choices with the seed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the Chiron-o1 record as JSON.")] = False,
) -> None:
    """Search one case with the models set in MICS_MENTORS, MICS_INTERNS and MICS_JUDGE."""
    from .errors import InputError, MicsError
    from .search import search

    try:
        result = asyncio.run(search(question, image or None, answer=answer, case_info=case_info, rid=rid))
    except InputError as exc:
        _say("Bad input", exc)
        raise typer.Exit(1) from None
    except MicsError as exc:  # settings, prompts, the cache
        raise _fail_config(str(exc)) from None
    if as_json:
        console.print_json(json.dumps(result.to_record(), ensure_ascii=False))
    else:
        _print_result(result, show_reasoning=True)
    if result.status == "model_error":
        raise typer.Exit(1)


@app.command()
def config() -> None:
    """Show the settings in effect (from MICS_* variables and .env)."""
    from .config import Settings, load_settings
    from .errors import ConfigError

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    for name, field in Settings.model_fields.items():
        console.print(f"[bold]MICS_{name.upper()}[/] = {getattr(settings, name)!r}  [dim]{field.description}[/]")


dataset_app = typer.Typer(help="Build the MMRP-style curriculum from MICS output.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


def _judge_name(option: str | None, configured: str) -> str | None:
    """--judge NAME, else MICS_JUDGE; 'none' (or empty) means grading rules only."""
    name = option if option is not None else configured
    return None if not name or name.strip().lower() == "none" else name.strip()


def _named_paths(values: list[str] | None, option: str) -> dict[str, Path]:
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise _fail_config(f"{option} takes NAME=FILE, got {value!r}")
        named[name] = Path(path)
    return named


@dataset_app.command("build")
def dataset_build(
    mics: Annotated[list[Path], typer.Option(help="MICS output (mics run --output); repeat for several.")],
    cases: Annotated[Path, typer.Option(help="The cases (mics run input): case ids and captions for Part 2.")],
    image_dir: Annotated[Path, typer.Option(help="Folder the image paths of cases and MICS output are relative to.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Curriculum folder to write.")],
    text_qa: Annotated[Optional[Path], typer.Option(help="Part 1 text QA (mics generate qa output).")] = None,
    vqa: Annotated[Optional[list[str]], typer.Option(help="A general VQA set as NAME=FILE (plain layout); repeat.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe YAML (default: the paper's Table 4 proportions).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling, shuffling and the split.")] = 0,
    judge: Annotated[Optional[str], typer.Option(help="Grades final answers of MICS output written before the "
                                                 "search did (default: MICS_JUDGE; none: rules only).")] = None,
    label_threshold: Annotated[float, typer.Option(help="Step data: a step is labelled good when its MICS-Score is "
                                                   "above this; 0 is Math-Shepherd's hard label.")] = 0.5,
    pair_margin: Annotated[float, typer.Option(help="Step data: least score difference of a preference pair.")] = 0.5,
    max_pairs_per_node: Annotated[int, typer.Option(help="Step data: most pairs from one prefix.")] = 3,
) -> None:
    """Build the three-stage curriculum from MICS output.

    Quality-controls MICS output, makes alignment pairs, assembles stages 1-3 and a test split, exports
    them (LLaVA, InternVL, TRL messages, HF datasets) and writes stats.json + stats.png.
    """
    from .config import load_settings
    from .dataset import BuildOptions, StepOptions, build_dataset, load_recipe
    from .errors import ConfigError, InputError, ModelCallError

    if output.exists() and not output.is_dir():
        raise _fail_config(f"--output {str(output)!r} is a file; the curriculum is a folder: give a folder path")
    try:
        options = BuildOptions(
            mics=mics, cases=cases, image_dir=image_dir, output=output, recipe=load_recipe(recipe),
            text_qa=text_qa, vqa=_named_paths(vqa, "--vqa"), seed=seed,
            judge=_judge_name(judge, load_settings().judge),
            steps=StepOptions(label_threshold, pair_margin, max_pairs_per_node),
        )
        report = build_dataset(options)
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    except InputError as exc:
        err_console.print(f"[bold red]Bad input:[/] {exc}")
        raise typer.Exit(1) from None
    except ModelCallError as exc:
        err_console.print(f"[bold red]Judge failed:[/] {exc}. Rerun to retry: the verdicts already given are cached.")
        raise typer.Exit(1) from None
    except OSError as exc:  # a full disk, a file-size limit, a folder that cannot be made
        _say("Cannot write the curriculum", f"{exc.filename or output}: {exc.strerror or exc}. Fix that and rerun "
             "(a rebuild writes every file again)")
        raise typer.Exit(1) from None
    if report.graded_here:
        how = f"judge {options.judge}" if options.judge else "the grading rules only (no judge: undecided ones are 'ungraded')"
        console.print(f"Graded the final answers of {report.graded_here} older MICS records with {how}.")
    for stage, count in report.stages.items():
        console.print(f"{stage}: {count} samples -> {output / stage}")
    eval_file = output / "test" / "eval.jsonl"
    console.print(f"test: {report.eval_items} held-out questions -> {eval_file} "
                  f"(score a model: mics eval --model MODEL --benchmark in_domain={eval_file} --output results/)",
                  soft_wrap=True)
    console.print(f"test: {report.test} samples -> {output / 'test'}")
    console.print(f"steps: {report.step_rows} step rows, {report.step_pairs} preference pairs -> {output / 'steps'}")
    for step, reasons in report.drops.items():
        console.print(f"dropped in {step}: " + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items())))
    console.print(f"stats: {output / 'stats.json'}, {output / 'stats.png'}")


@dataset_app.command("steps")
def dataset_steps(
    mics: Annotated[list[Path], typer.Option(help="MICS output (mics run --output; its _failed.jsonl beside it is "
                                             "read too); repeat for several.")],
    image_dir: Annotated[Path, typer.Option(help="Folder the image paths of the MICS output are relative to.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the step data to.")],
    cases: Annotated[Optional[Path], typer.Option(help="The cases (mics run input), when their case ids differ from "
                                                  "the item ids: the split holds out case ids.")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Share of case ids held out, giving no step data "
                                                           "(default: the default recipe's, 0.05).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split (the same as mics dataset build's for the same split).")] = 0,
    label_threshold: Annotated[float, typer.Option(help="A step is labelled good when its MICS-Score is above this; "
                                                   "0 is Math-Shepherd's hard label.")] = 0.5,
    pair_margin: Annotated[float, typer.Option(help="Least score difference of a preference pair of siblings.")] = 0.5,
    max_pairs_per_node: Annotated[int, typer.Option(help="Most pairs from one prefix (largest gaps first).")] = 3,
) -> None:
    """Step-reward rows and step preference pairs from the search trees of any run's outputs.

    Writes steps.jsonl (TRL stepwise supervision with MICS-Scores), pairs.jsonl (TRL preference pairs with
    images), hf/steps and hf/pairs (datasets folders), images/ and stats.json + stats.png into --output.
    Cases held out by the same --seed and --test-fraction as mics dataset build give nothing.
    """
    from .dataset import StepOptions, default_recipe, read_step_records, write_steps
    from .dataset.build import item_case_id, read_jsonl
    from .dataset.images import ImageCatalog
    from .dataset.stats import write_step_stats
    from .errors import ConfigError, InputError

    try:
        options = StepOptions(label_threshold, pair_margin, max_pairs_per_node)
        fraction = default_recipe().test_fraction if test_fraction is None else test_fraction
        if not 0 <= fraction < 1:
            raise ConfigError(f"--test-fraction must be at least 0 and below 1 (got {fraction})")
        if not image_dir.is_dir():
            raise InputError(f"image folder {str(image_dir)!r} not found")
        case_of = dict(item_case_id(record) for record in read_jsonl(cases, "cases")) if cases is not None else {}
        stats = write_steps(
            read_step_records(mics), output, image_dir=image_dir, images_root=output / "images",
            catalog=ImageCatalog(), options=options, test_fraction=fraction, seed=seed, case_of=case_of,
        )
        write_step_stats(stats.as_dict(), output)
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    except InputError as exc:
        _say("Bad input", exc)
        raise typer.Exit(1) from None
    except OSError as exc:
        _say("Cannot write the step data", f"{exc}; give --output a folder you can write")
        raise typer.Exit(1) from None
    labels = stats.labels
    console.print(f"{stats.rows} step rows ({labels['true']} labelled good, {labels['false']} not) "
                  f"-> {output / 'steps.jsonl'}", soft_wrap=True)
    console.print(f"{stats.pairs} preference pairs -> {output / 'pairs.jsonl'}", soft_wrap=True)
    for reason, count in sorted(stats.records_skipped.items()):
        console.print(f"records without step data: {reason} {count}", soft_wrap=True)
    console.print(f"stats: {output / 'stats.json'}, {output / 'stats.png'}", soft_wrap=True)


class GenerateKind(str, Enum):
    qa = "qa"
    vqa = "vqa"


@app.command()
def generate(
    kind: Annotated[GenerateKind, typer.Argument(help="qa: 1-3 multiple-choice questions per case from its text "
                                                   "(Part 1). vqa: VQA pairs in three scenarios per case from "
                                                   "its record and images (mics run input).")],
    data: Annotated[Path, typer.Argument(help="Cases, one JSON object per line (id, text / case_info / Chiron-o1 case fields, images).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Generated items, one per line.")],
    image_dir: Annotated[Optional[Path], typer.Option(help="Folder the image paths are relative to (default: the data file's folder).")] = None,
    failed: Annotated[Optional[Path], typer.Option(help="Failures (default: OUTPUT with _failed.jsonl).")] = None,
    cache: Annotated[Optional[str], typer.Option(help="SQLite cache file (default: MICS_CACHE_PATH; '' for none).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Generator model (default: MICS_GENERATOR, else the first mentor).")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Cases in flight.")] = 8,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N cases.")] = None,
    shard: Annotated[str, typer.Option(help="I/N: take shard I of N.")] = "0/1",
    budget_usd: Annotated[Optional[float], typer.Option(min=0, help="Start no new case past this spend.")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Also redo cases that gave nothing usable.")] = False,
    json_summary: Annotated[Optional[Path], typer.Option(help="Also write the summary as JSON here.")] = None,
    log_every: Annotated[float, typer.Option(help="Seconds between log lines when not on a terminal.")] = 10.0,
) -> None:
    """Make Part 1 text QA or MICS input (VQA pairs) from raw cases with an LLM; resumable like mics run."""
    from .generate import open_generation_worker
    from .outputs import GROUP_KEY
    from .progress import GENERATION
    from .runner import run_id_for

    async def open_worker(settings: "Settings"):
        return await open_generation_worker(kind.value, settings, run_id=run_id_for(output))

    _batch_command(
        open_worker,
        {"cache_path": cache, "generator": model},
        data=data, shard=shard, check_roles=False, log_every=log_every, json_summary=json_summary, group_key=GROUP_KEY,
        kind=GENERATION, output=output, image_dir=image_dir, failed=failed, concurrency=concurrency, limit=limit,
        retry_failed=retry_failed, budget_usd=budget_usd,
    )


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="The model to evaluate: a LiteLLM name, e.g. hosted_vllm/chiron-o1-8b.")],
    benchmark: Annotated[list[str], typer.Option(help="[NAME=]FILE of a benchmark in a published layout; repeat.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result folder.")],
    judge: Annotated[Optional[str], typer.Option(help="Judge for answers the grading rules leave open (default: "
                                                 "MICS_JUDGE; none: rules only, open answers get token recall).")] = None,
    image_root: Annotated[Optional[list[str]], typer.Option(help="NAME=DIR: where a benchmark's images are (default: beside its file).")] = None,
    mics_score: Annotated[bool, typer.Option(help="Also score the model's reasoning: MICS_INTERNS continue from its steps.")] = False,
    bertscore: Annotated[bool, typer.Option(help="Also BERTScore (roberta-large) of open answers, as the published "
                                                 "evaluation; needs bert-score and the model in the HF cache.")] = False,
    cache: Annotated[Optional[str], typer.Option(help="SQLite cache file (default: MICS_CACHE_PATH; '' for none).")] = None,
    cache_namespace: Annotated[Optional[str], typer.Option(
        help="Cache namespace of the evaluated model's answers (default: MICS_CACHE_NAMESPACE, else the output "
             "folder: resuming into it replays them, a new folder asks the model again). Give the same word to "
             "share answers between folders on purpose.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Questions in flight.")] = 16,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions of each benchmark.")] = None,
    log_every: Annotated[float, typer.Option(help="Seconds between log lines when not on a terminal.")] = 10.0,
) -> None:
    """Evaluate a model on medical VQA benchmarks; resumable like mics run.

    Accuracy with 95% CIs per benchmark and modality, parse failures counted as wrong, and optionally
    the MICS-Score of the model's reasoning.
    """
    from .config import load_settings
    from .errors import ConfigError, MicsError
    from collections import Counter

    from .evaluation import EvalWorker, detect_layout, prepare_benchmark, results_markdown, summarize
    from .grading import GRADER_VERSION
    from .outputs import OutputLock, rewrite_jsonl
    from .progress import EVALUATION
    from .models.factory import open_models
    from .runner import RunOptions, run_id_for
    from .store import Store

    try:
        settings = load_settings(**({"cache_path": cache} if cache is not None else {}))
        judge_name = _judge_name(judge, settings.judge)
        if mics_score and not settings.interns:
            raise ConfigError("--mics-score needs interns: set MICS_INTERNS")
        benchmarks = _named_paths([spec if "=" in spec else f"{Path(spec).stem}={spec}" for spec in benchmark], "--benchmark")
        roots = _named_paths(image_root, "--image-root")
        _check_start(settings)
        image_budget = None
        if settings.router_config:  # served by mics serve: the image budget the model answered under
            from .serve import served_image_budget

            image_budget = served_image_budget(settings.router_config, model)
    except MicsError as exc:
        raise _fail_config(str(exc)) from None
    # The evaluated model's answers are keyed by the output folder too: a checkpoint retrained and served
    # under the same name is evaluated into a new folder, and must never be graded with the old one's replies.
    evaluated_namespace = (
        cache_namespace if cache_namespace is not None
        else settings.cache_namespace_for(model) or f"eval-output:{output.resolve()}"
    )

    predictions: dict[str, list[dict]] = {}
    failures: dict[str, dict[str, int]] = {}
    layouts: dict[str, str] = {}
    for name, path in benchmarks.items():
        try:
            prepared = prepare_benchmark(path, output / name, detect_layout(path), roots.get(name))
        except (MicsError, OSError, ValueError, KeyError) as exc:
            _say(f"Benchmark {name}", f"cannot read {path}: {exc}")
            raise typer.Exit(1) from None
        layouts[name] = prepared.layout
        console.print(f"[bold]{name}[/]: {prepared.count} questions ({prepared.layout} layout), images from "
                      f"{prepared.image_root}", soft_wrap=True)
        for warning in prepared.warnings:
            _say("Warning", warning, colour="yellow")
        predictions_path = output / name / "predictions.jsonl"
        options = RunOptions(data=prepared.items, output=predictions_path, image_dir=prepared.image_root,
                             concurrency=concurrency, limit=limit)

        async def open_worker(name: str = name) -> EvalWorker:
            store = await Store.open(settings.cache_path) if settings.cache_path else None
            opened: list = []
            try:
                run_id = run_id_for(predictions_path)
                opened += open_models([model], settings, store, run_id=run_id, namespace=evaluated_namespace)
                opened += open_models([judge_name], settings, store, run_id=run_id) if judge_name else []
                interns = open_models(settings.interns, settings, store, run_id=run_id) if mics_score else []
                opened += interns
                grader = opened[1] if judge_name else None
                return EvalWorker(opened[0], settings, store, benchmark=name, judge=grader, interns=interns)
            except BaseException:
                # Closed here: an open cache connection's (non-daemon) thread would keep the process alive.
                for opened_model in opened:
                    await opened_model.aclose()
                if store is not None:
                    await store.close()
                raise

        try:
            stats = _run_batch(open_worker, options, settings, log_every=log_every, kind=EVALUATION)
        except ConfigError as exc:
            raise _fail_config(str(exc)) from None
        except MicsError as exc:
            _say("Run stopped", exc)
            raise typer.Exit(1) from None
        if stats.stop_reason != "completed":
            raise typer.Exit(_exit_code(stats))
        try:
            with OutputLock(predictions_path):  # the regrade rewrites the file: own it meanwhile
                predictions[name] = _load_predictions(predictions_path)
                regraded = _regrade(predictions[name], judge_name, settings)
                if regraded:
                    rewrite_jsonl(predictions_path, predictions[name])
        except MicsError as exc:
            err_console.print(f"[bold red]{name}:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_CONFIG_ERROR) from None
        if regraded:
            console.print(f"{name}: regraded {regraded} stored predictions graded by an older grader (grader v{GRADER_VERSION}).")
        if bertscore:
            from .evaluation.similarity import add_bertscore

            try:
                add_bertscore(predictions[name])
            except ConfigError as exc:
                raise _fail_config(str(exc)) from None
        # Predictions of items the benchmark no longer holds as loaded now (a loader that learned the split).
        current = [record for record in predictions[name] if str(record.get("rid")) in prepared.ids]
        if len(current) < len(predictions[name]):
            _say("Note", f"{name}: {len(predictions[name]) - len(current)} stored predictions are for items not in "
                 "the benchmark as loaded now (e.g. train rows); they are left out", colour="yellow")
        predictions[name] = current
        failures[name] = {kind: getattr(stats, kind) for kind in ("bad_input", "model_error", "internal_error")
                          if getattr(stats, kind)}

    results = {
        "model": model,
        "judge": judge_name,
        "image_budget": image_budget,
        "benchmarks": {
            name: {**summarize(items), "layout": layouts[name], "not_scored": sum(failures[name].values()),
                   "not_scored_by_kind": failures[name]}
            for name, items in predictions.items()
        },
        "overall": summarize(item for items in predictions.values() for item in items),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    markdown = results_markdown(results)
    (output / "results.md").write_text(markdown, encoding="utf-8")
    console.print(markdown, markup=False, highlight=False)
    if results["overall"]["graded"] == 0:
        totals: Counter = Counter()
        for counts in failures.values():
            totals.update(counts)
        reasons = ", ".join(f"{count} {kind}" for kind, count in sorted(totals.items()))
        ungraded = results["overall"]["n"]
        _say("No answer was graded", f"{reasons or 'no item failed'}; {ungraded} answered but ungraded (open answers "
             "without a judge get recall only). See */predictions_failed.jsonl; results.json says the same")
        raise typer.Exit(1)
    if any(failures.values()):
        err_console.print("[yellow]Some questions could not be scored (see */predictions_failed.jsonl); rerun to retry model errors.[/]")


def _load_predictions(path: Path) -> list[dict]:
    """Prediction lines; only newlines separate them (a reply may hold U+2028, which splitlines() splits on)."""
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="\n") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _regrade(predictions: list[dict], judge_name: str | None, settings: Any) -> int:
    from .errors import ModelCallError
    from .evaluation.worker import regrade_predictions

    try:
        return asyncio.run(regrade_predictions(predictions, judge_name, settings))
    except ModelCallError as exc:
        err_console.print(f"[bold red]Judge failed while regrading:[/] {exc}. Rerun to retry.")
        raise typer.Exit(1) from None


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="Result folders of mics eval, or output files of mics run "
                                                     "(e.g. the MICS and the vanilla arm on one input).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the table here (markdown).")] = None,
) -> None:
    """Compare runs side by side: mics eval folders (accuracy per benchmark), or mics run outputs (full-score
    paths, MICS-Score, depth, trend, and calls and cost per kept path)."""
    from .errors import InputError
    from .evaluation import compare_results
    from .run_comparison import compare_runs

    run_outputs = [path for path in paths if path.suffix == ".jsonl"]
    try:
        if run_outputs and len(run_outputs) != len(paths):
            raise InputError("give either mics eval result folders or mics run output files (.jsonl), not both")
        table = compare_runs(paths) if run_outputs else compare_results(paths)
    except (FileNotFoundError, InputError) as exc:
        err_console.print(f"[bold red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    if output:
        output.write_text(table, encoding="utf-8")
    console.print(table, markup=False, highlight=False)


@app.command()
def serve(
    config: Annotated[Path, typer.Option(help="YAML naming each intern model and its replicas (see README).")],
    dry_run: Annotated[bool, typer.Option(help="Print the commands and the Router config; start nothing.")] = False,
) -> None:
    """Serve local interns on vLLM replicas behind a LiteLLM Router config.

    Starts a vLLM server per configured replica, waits until all are healthy, writes a Router config
    mapping each intern name to its replicas, and stops them all on Ctrl-C.
    """
    from .errors import ConfigError, MicsError
    from .serve import InternServers, dry_run_commands, load_serve_config

    try:
        settings = load_serve_config(config)
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    if dry_run:
        try:
            commands = dry_run_commands(settings)
        except ConfigError as exc:
            raise _fail_config(str(exc)) from None
        for command in commands:  # each one shell-quoted: pasting it runs that command and nothing else
            console.print(command, markup=False, highlight=False, soft_wrap=True)
        return
    servers = InternServers(settings, log=lambda message: err_console.print(message, markup=False, highlight=False))
    try:
        path = servers.start()
        names = ",".join(spec.name for spec in settings.models)
        console.print(f"All replicas are up. Router config: {path}\nUse them with:\n"
                      f"  export MICS_ROUTER_CONFIG={path.resolve()} MICS_INTERNS={names}", soft_wrap=True)
        asyncio.run(servers.wait_for_signal())
    except MicsError as exc:
        err_console.print(f"[bold red]Serve stopped:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        servers.stop()


@app.command()
def report(
    output: Annotated[Path, typer.Argument(help="Successes of a run (the --output of mics run), one record per line.")],
    html: Annotated[Path, typer.Option("--html", help="The report to write: one self-contained HTML file.")],
    failed: Annotated[Optional[Path], typer.Option(help="Failures of the run (default: OUTPUT with _failed.jsonl, if it exists).")] = None,
    image_dir: Annotated[Optional[Path], typer.Option(help="Folder the image paths are relative to (as given to mics run): embeds a small thumbnail of each image (default: no images).")] = None,
    thumbnail_size: Annotated[int, typer.Option(min=32, max=1024, help="Longest side of a thumbnail, in pixels.")] = 160,
    title: Annotated[Optional[str], typer.Option(help="Page title (default: 'MICS report: OUTPUT').")] = None,
) -> None:
    """Write a run's report: charts, a searchable item list and every search tree, in one HTML file.

    The file is static (no server, no network): open it from disk or mail it.
    """
    from .errors import ConfigError, InputError
    from .report import write_report

    try:
        # The page replaces the file there: never a device, FIFO or folder someone named by mistake.
        _check_writable_path(html, "--html")
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    try:
        data = write_report(output, html, failed=failed, image_dir=image_dir, thumbnail_size=thumbnail_size, title=title)
    except InputError as exc:
        err_console.print(f"[bold red]Bad input:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except OSError as exc:
        err_console.print(f"[bold red]Cannot write the report:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    for warning in data.warnings:
        err_console.print(f"[yellow]Note:[/] {escape(warning)}")
    counts = ", ".join(f"{count} {status}" for status, count in data.summary["status"].items())
    console.print(f"{data.summary['items']} items ({counts}) -> {escape(str(html))} ({html.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    from .images import return_freed_buffers_to_the_os

    return_freed_buffers_to_the_os()  # so the decode budget bounds resident memory, not just live buffers
    try:
        app()
    except Exception as exc:  # a defect: say so, and show where, without any secret
        import traceback

        from .redact import scrub

        sys.stderr.write(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        sys.stderr.write("mics: internal error: this is a defect in mics-agents; please report it with the lines above.\n")
        raise SystemExit(1) from None
