"""The ``mics`` command line. Heavy imports (LiteLLM, the search) happen inside commands, so
``mics --help`` stays fast."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from .results import SearchResult

app = typer.Typer(
    name="mics",
    help="Mentor-Intern Collaborative Search: verified step-by-step medical reasoning data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_CONFIG_ERROR = 2
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def _fail_config(message: str) -> typer.Exit:
    err_console.print(f"[bold red]Configuration error:[/] {message}")
    return typer.Exit(EXIT_CONFIG_ERROR)


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
        summary += f"  {result.message}"
    usage = result.usage
    summary += f"\n[dim]{usage.calls} calls ({usage.cached_calls} cached), {usage.input_tokens + usage.output_tokens} tokens, ${usage.cost_usd:.4f}[/]"
    console.print(Panel(summary, title=result.rid, title_align="left"))
    if show_reasoning and result.reasoning:
        console.print(result.reasoning, markup=False, highlight=False)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Where to write the records (JSONL).")] = Path("mics_demo_output.jsonl"),
    cache: Annotated[
        Optional[Path], typer.Option(help="SQLite cache; a rerun replays every call from it.")
    ] = Path("mics_demo_cache.sqlite"),
    seed: Annotated[int, typer.Option(help="Run seed.")] = 0,
) -> None:
    """Run MICS offline on the example cases that ship with mics-agents, with SIMULATED models."""
    from .config import load_settings
    from .models.simulated import simulated_intern, simulated_judge, simulated_mentor
    from .search import Searcher
    from .store import Store

    console.print(
        "[bold yellow]SIMULATED MODELS[/]: the mentors, interns and judge below are offline stand-ins "
        "that imitate model behaviour. Their reasoning is a template, not medicine."
    )
    cases = [json.loads(line) for line in (EXAMPLES_DIR / "cases.jsonl").read_text().splitlines() if line.strip()]
    settings = load_settings(seed=seed, cache_path=cache, mentors=[], interns=[], judge="")

    async def run() -> list["SearchResult"]:
        store = await Store.open(cache) if cache else None
        searcher = Searcher(
            mentors=[simulated_mentor("simulated/mentor-a"), simulated_mentor("simulated/mentor-b")],
            interns=[simulated_intern("simulated/intern-1"), simulated_intern("simulated/intern-2")],
            judge=simulated_judge(),
            settings=settings,
            store=store,
            owns_store=True,
        )
        async with searcher:
            return list(
                await asyncio.gather(
                    *(
                        searcher.search(
                            case["question"],
                            [EXAMPLES_DIR / "images" / name for name in case["images"]],
                            answer=case["answer"],
                            case_info=case["case_info"],
                            rid=case["id"],
                        )
                        for case in cases
                    )
                )
            )

    results = asyncio.run(run())
    with output.open("w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result.to_record(), ensure_ascii=False) + "\n")
    for index, result in enumerate(results):
        _print_result(result, show_reasoning=index == 0)
    console.print(f"\nWrote {len(results)} records to {output}.")
    console.print(
        "To use real models, set e.g.\n"
        "  export MICS_MENTORS=openai/gpt-4o,gemini/gemini-2.5-pro MICS_INTERNS=hosted_vllm/Qwen/Qwen2.5-VL-7B-Instruct\n"
        "  export MICS_JUDGE=openai/gpt-4o-mini OPENAI_API_KEY=... GEMINI_API_KEY=... HOSTED_VLLM_API_BASE=http://localhost:8000/v1\n"
        "and run: mics search 'QUESTION' --answer 'ANSWER' --image scan.png",
        soft_wrap=True,
    )


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
    from .errors import ConfigError, InputError
    from .search import search

    try:
        result = asyncio.run(search(question, image or None, answer=answer, case_info=case_info, rid=rid))
    except ConfigError as exc:
        raise _fail_config(str(exc)) from None
    except InputError as exc:
        err_console.print(f"[bold red]Bad input:[/] {exc}")
        raise typer.Exit(1) from None
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


def main() -> None:
    app()
