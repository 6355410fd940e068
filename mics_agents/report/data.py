"""The data a report page is drawn from: every item of a run in a compact form, and the run's summary.

The summary is computed here, not in the page, so that it can be tested; the page only draws it. Items keep
what a person needs to judge a search (question, images, the whole tree with every intern sample, the saved
reasoning, the error of a failure) under short keys, with mentor and intern names replaced by their index in
``mentors`` / ``interns``:

    item   {i, rid, status, line?, q, a, img: [path], depth, trend, sid, score, win, path: [mentor],
            err?, input?, reasoning, usage: [calls, cached, input_tokens, output_tokens, cost], tree: [node]}
    node   {id, p (parent), d (depth), m (mentor), s (step text), sc (score), sel, re (reused), x: [sample]}
    sample [intern, temperature, sample_index, answer, correct, format_ok, judged_by]

The summary's ``steps`` counts the step rows and sibling preference pairs ``mics dataset steps`` would make
from the run's success and ``no_path`` trees with its default settings, before any split.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import failure_input
from ..dataset.steps import StepStats, count_tree
from ..errors import ImageError, InputError
from ..images import DEFAULT_MAX_PIXELS, decode_budget, decode_cost, to_8bit
from ..outputs import default_failed_path, failure_key, foreign_failure, foreign_success, success_line, winning_lines

__all__ = ["ReportData", "build_report_data", "run_files", "STATUSES", "DEFAULT_THUMBNAIL_SIZE"]

STATUSES = ("success", "no_path", "model_error", "bad_input", "internal_error")
DEFAULT_THUMBNAIL_SIZE = 160
# A bad input line is shown as it was read, cut to this many characters (a line can be a whole file).
MAX_INPUT_CHARS = 4000
_USAGE_FIELDS = ("calls", "cached_calls", "input_tokens", "output_tokens", "cost_usd")


@dataclass
class ReportData:
    title: str
    sources: dict[str, str | None]
    summary: dict[str, Any]
    mentors: list[str]
    interns: list[str]
    items: list[dict[str, Any]]
    images: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        """What the page embeds (as JSON)."""
        return {
            "version": 1,
            "title": self.title,
            "sources": self.sources,
            "summary": self.summary,
            "mentors": self.mentors,
            "interns": self.interns,
            "statuses": list(self.summary["status"]),
            "items": self.items,
            "images": self.images,
            "warnings": self.warnings,
        }


def _read_jsonl(path: Path, warnings: list[str], bad_lines: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON objects of a file with their line numbers; a line that is not one is counted in ``bad_lines``,
    not fatal (a run that is still going can leave a torn last line)."""
    first_bad = len(bad_lines)
    with open(path, "rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            try:
                record = json.loads(raw_line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                record = None
            if not isinstance(record, dict):
                bad_lines.append(number)
                continue
            yield number, record
    skipped = bad_lines[first_bad:]
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.append(f"{path.name}: skipped {len(skipped)} line(s) that are not JSON objects (line {shown})")


def _number(value: Any) -> float | None:
    """A finite number, else None (JSON has no NaN; a bool is not a number here)."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    return value if kind is int else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _depth(value: Any) -> int | None:
    try:
        depth = int(value)
    except (TypeError, ValueError):
        return None
    return depth if depth > 0 else None


def _input_text(raw: Any) -> str:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, indent=2)
    return text if len(text) <= MAX_INPUT_CHARS else text[:MAX_INPUT_CHARS] + f"\n... ({len(text) - MAX_INPUT_CHARS} more characters)"


def _question_of_input(raw: Any) -> tuple[str, str, list[str]]:
    """Question, answer and image paths of a raw input line, as far as they can be read (either layout)."""
    from ..data import parse_record

    item = parse_record(raw, 0)
    images = raw.get("images") if isinstance(raw, dict) else None
    if isinstance(images, str):
        images = [images]
    images = [image for image in images if isinstance(image, str) and image] if isinstance(images, list) else []
    return item.question, item.answer, images


class _Builder:
    def __init__(self) -> None:
        self.mentors: dict[str, int] = {}
        self.interns: dict[str, int] = {}
        self.mentor_names: list[str] = []
        self.intern_names: list[str] = []
        self.items: list[dict[str, Any]] = []
        self.status = Counter({status: 0 for status in STATUSES})
        self.search_id: Counter = Counter()
        self.depth: Counter = Counter()
        self.trend: Counter = Counter()
        self.wins: Counter = Counter()
        self.mentor_candidates: Counter = Counter()
        self.mentor_selected: Counter = Counter()
        self.mentor_score_sum: defaultdict[str, float] = defaultdict(float)
        self.mentor_scored: Counter = Counter()
        # (intern index, temperature, correct, format_ok, judged_by) -> how many samples
        self.sample_kinds: Counter = Counter()
        self.usage = dict.fromkeys(_USAGE_FIELDS, 0)
        self.usage["cost_usd"] = 0.0
        self.usage["online_cost_usd"] = 0.0
        self.steps = StepStats()  # the step rows and pairs the trees give (mics dataset steps, default settings)

    def _index(self, table: dict[str, int], name: Any) -> int:
        name = _text(name)
        if name not in table:
            table[name] = len(table)
            (self.mentor_names if table is self.mentors else self.intern_names).append(name)
        return table[name]

    def add(self, status: str, record: dict[str, Any], *, line: int | None = None, error: str = "",
            raw_input: Any = None, has_input: bool = False) -> None:
        """One item. ``record`` is a search's record (``SearchResult.to_record()``: a success line, or the
        ``search`` of a failure) or holds only ``rid`` for an item that was never searched."""
        self.status[status] += 1
        item: dict[str, Any] = {"i": len(self.items), "rid": _text(record.get("rid")), "status": status}
        if line is not None:
            item["line"] = line
        if error:
            item["err"] = error
        question, answer, images = _text(record.get("question")), _text(record.get("gt_answer")), record.get("images")
        if has_input:
            item["input"] = _input_text(raw_input)
            if "question" not in record:  # not searched (bad input): read what the input line has
                question, answer, images = _question_of_input(raw_input)
        images = [image for image in images if isinstance(image, str) and image] if isinstance(images, list) else []
        tree = record.get("tree") if isinstance(record.get("tree"), list) else []
        generated_by = record.get("generated_by") if isinstance(record.get("generated_by"), list) else []
        generated_by = [_text(name) for name in generated_by if name is not None]
        item.update(
            q=question,
            a=answer,
            img=images,
            depth=_depth(record.get("final_depth")),
            trend=record.get("trend") if isinstance(record.get("trend"), str) else None,
            sid=record.get("search_id") if record.get("search_id") in ("0", "1") else None,
            score=_number(record.get("mics_score")),
            path=[self._index(self.mentors, name) for name in generated_by],
            win=None,
            reasoning=_text(record.get("reasoning")),
            tree=[self._node(node) for node in tree if isinstance(node, dict)],
        )
        for node in item["tree"]:  # mentors that took part, also when none of them won
            self._count_node(node)
        if status in ("success", "no_path"):  # the outcomes step data is made from
            count_tree(record, self.steps)
        usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
        item["usage"] = [_number(usage.get(key)) or 0 for key in _USAGE_FIELDS]
        for key, value in zip(_USAGE_FIELDS, item["usage"]):
            self.usage[key] += value
        online = _number(usage.get("online_cost_usd"))  # a batched run's replies at online prices (--batch)
        self.usage["online_cost_usd"] += online if online is not None else item["usage"][-1]
        if status == "success":
            if generated_by:
                item["win"] = item["path"][-1]
                self.wins[generated_by[-1]] += 1
            self.search_id[item["sid"] or "none"] += 1
            self.depth[str(item["depth"]) if item["depth"] else "none"] += 1
            self.trend[item["trend"] or "none"] += 1
        self.items.append(item)

    def _node(self, node: dict[str, Any]) -> dict[str, Any]:
        samples = []
        interns = self.interns
        for sample in node.get("samples") if isinstance(node.get("samples"), list) else []:
            if not isinstance(sample, dict):
                continue
            intern, answer, judged_by = sample.get("intern"), sample.get("answer"), sample.get("judged_by")
            index = sample.get("sample_index")
            samples.append([
                interns[intern] if isinstance(intern, str) and intern in interns else self._index(interns, intern),
                _number(sample.get("temperature")),
                index if type(index) is int else None,
                answer if type(answer) is str else _text(answer),
                1 if sample.get("correct") is True else 0,
                1 if sample.get("format_ok") is True else 0,
                judged_by if type(judged_by) is str else _text(judged_by),
            ])
        step = node.get("step")
        if not isinstance(step, str) or not step:
            steps = node.get("steps") if isinstance(node.get("steps"), list) else []
            step = "\n\n".join(_text(text) for text in steps)
        return {
            "id": node.get("id") if isinstance(node.get("id"), int) else None,
            "p": node.get("parent") if isinstance(node.get("parent"), int) else None,
            "d": _depth(node.get("depth")),
            "m": self._index(self.mentors, node.get("mentor")),
            "s": step,
            "sc": _number(node.get("score")),
            "sel": 1 if node.get("selected") is True else 0,
            "re": 1 if node.get("reused") is True else 0,
            "x": samples,
        }

    def _count_node(self, node: dict[str, Any]) -> None:
        mentor = self.mentor_names[node["m"]]
        self.mentor_candidates[mentor] += 1
        self.mentor_selected[mentor] += node["sel"]
        if node["sc"] is not None:
            self.mentor_score_sum[mentor] += node["sc"]
            self.mentor_scored[mentor] += 1
        # One count per kind of sample; the per-intern sums are made once, in summary().
        self.sample_kinds.update((x[0], x[1], x[4], x[5], x[6]) for x in node["x"])

    def summary(self, unreadable: int) -> dict[str, Any]:
        def share(part: float, whole: float) -> float | None:
            return part / whole if whole else None

        intern_samples: Counter = Counter()
        intern_correct: Counter = Counter()
        intern_format_ok: Counter = Counter()
        intern_truncated: Counter = Counter()
        temperature_samples: Counter = Counter()
        temperature_correct: Counter = Counter()
        judged_by: Counter = Counter()
        for (intern_index, temperature, correct, format_ok, judge), count in self.sample_kinds.items():
            intern = self.intern_names[intern_index]
            intern_samples[intern] += count
            intern_correct[intern] += correct * count
            intern_format_ok[intern] += format_ok * count
            intern_truncated[intern] += count if judge == "truncated" else 0
            temperature_samples[intern, temperature] += count
            temperature_correct[intern, temperature] += correct * count
            judged_by[judge or "unknown"] += count

        interns = {}
        for intern in self.interns:
            temperatures = sorted(t for (name, t) in temperature_samples if name == intern and t is not None)
            temperatures += [None] if (intern, None) in temperature_samples else []
            interns[intern] = {
                "samples": intern_samples[intern],
                "correct": intern_correct[intern],
                "accuracy": share(intern_correct[intern], intern_samples[intern]),
                "format_ok": intern_format_ok[intern],
                # Cut off by the token budget even at twice the budget: a sign MICS_INTERN_MAX_TOKENS is too small.
                "truncated": intern_truncated[intern],
                "by_temperature": [
                    {"temperature": t, "samples": temperature_samples[intern, t],
                     "correct": temperature_correct[intern, t],
                     "accuracy": share(temperature_correct[intern, t], temperature_samples[intern, t])}
                    for t in temperatures
                ],
            }
        mentors = {
            mentor: {
                "wins": self.wins[mentor],
                "candidates": self.mentor_candidates[mentor],
                "selected": self.mentor_selected[mentor],
                "mean_score": share(self.mentor_score_sum[mentor], self.mentor_scored[mentor]),
            }
            for mentor in self.mentors
        }
        usage = dict(self.usage)
        usage["cost_usd"] = round(usage["cost_usd"], 10)
        usage["online_cost_usd"] = round(usage["online_cost_usd"], 10)
        return {
            "items": len(self.items),
            "status": dict(self.status),
            "search_id": dict(sorted(self.search_id.items())),
            "depth": dict(sorted(self.depth.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0].isdigit() else 0))),
            "trend": _ordered(self.trend, ("increasing", "constant", "fluctuating", "non-increasing", "none")),
            "mentor_wins": {mentor: self.wins[mentor] for mentor in self.mentors},
            "mentors": mentors,
            "interns": interns,
            "judged_by": _ordered(judged_by, ("exact", "option", "yes_no", "judge", "unparsed", "truncated")),
            "usage": usage,
            "steps": self.steps.as_dict(),
            "unreadable_lines": unreadable,
        }


def _ordered(counts: Counter, order: tuple[str, ...]) -> dict[str, int]:
    known = {key: counts[key] for key in order if counts[key]}
    return {**known, **{key: value for key, value in sorted(counts.items()) if key not in known}}


def _inside(folder: Path, relative: str) -> Path | None:
    """``folder/relative`` if it stays inside ``folder`` (image paths come from the records: untrusted)."""
    root = folder.resolve()
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) and candidate.is_file() else None


def thumbnail_data_url(path: Path, size: int = DEFAULT_THUMBNAIL_SIZE, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """A JPEG thumbnail (longest side ``size`` px) as a data URL. Raises OSError/ValueError on a bad image,
    :class:`ImageError` on one above ``max_pixels``. Decodes under the process's decode budget, like a run."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as probe:  # the header only: its size as the decode will see it
            probe.draft("RGB", (size, size))
            width, height, mode = probe.width, probe.height, probe.mode
        if width * height > max_pixels:
            raise ImageError(f"{path.name} is {width}x{height} pixels, above the cap of {max_pixels:,}")
        # Every buffer of the decode is freed inside the budget's hold: none outlives it.
        with decode_budget.hold(decode_cost(width, height, mode, path.stat().st_size)):
            with Image.open(path) as opened:
                opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster on big images
                opened.load()
                image = opened.convert("I") if opened.mode.startswith("I;16") else opened
                factor = max(image.size) // (2 * size)
                if factor >= 2:
                    image = image.reduce(factor)  # before anything else makes a full-size copy
                image = to_8bit(image)
                if image.mode in ("RGBA", "LA", "P", "PA"):
                    image = image.convert("RGBA")
                    background = Image.new("RGB", image.size, (255, 255, 255))
                    background.paste(image, mask=image.getchannel("A"))
                    image = background
                image = image.convert("RGB") if image.mode != "L" else image
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80, optimize=True)
                del image
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnails(paths: list[str], image_dir: Path, size: int, warnings: list[str]) -> dict[str, str | None]:
    from PIL import Image

    too_large: list[str] = []

    def one(relative: str) -> str | None:
        try:
            path = _inside(image_dir, relative)
            if path is None:
                return None
            return thumbnail_data_url(path, size, max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError:
            too_large.append(relative)
            return None
        except (OSError, ValueError, SyntaxError, EOFError, RuntimeError, MemoryError, Image.DecompressionBombError):
            return None

    # Threads overlap file reads and decodes; the decode budget bounds how much memory they hold at once.
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding and resizing release the GIL
        urls = dict(zip(paths, pool.map(one, paths)))
    missing = [path for path, url in urls.items() if url is None and path not in too_large]
    if missing:
        warnings.append(
            f"{len(missing)} of {len(paths)} image(s) not found or unreadable under {image_dir} (e.g. {missing[0]})"
        )
    if too_large:
        warnings.append(
            f"{len(too_large)} image(s) above {DEFAULT_MAX_PIXELS:,} pixels shown without a thumbnail "
            f"(e.g. {too_large[0]}): a run refuses them too"
        )
    return urls


_Numbered = list[tuple[int, dict[str, Any]]]
_FAILED_SUFFIX = "_failed.jsonl"


def run_files(path: Path, failed: Path | None = None) -> tuple[Path, Path | None]:
    """The success file and the failed file (None if there is none) of the run that ``path`` names: its
    success file ``OUT.jsonl`` or its failed file ``OUT_failed.jsonl``. A run where nothing succeeded may have
    no success file at all; a run with no failures has no failed file.

    Raises :class:`InputError` if neither file exists, or if a failed file given explicitly is missing."""
    if failed is not None and not failed.is_file():
        raise InputError(f"failed file {str(failed)!r} not found")
    output = path
    named_as_failed = path.name.endswith(_FAILED_SUFFIX) and not default_failed_path(path).is_file()
    if failed is None and named_as_failed:
        # OUT_failed.jsonl given: report the whole run (an output really named x_failed.jsonl has its own
        # x_failed_failed.jsonl beside it, and is read as the success file it is).
        output, failed = path.with_name(path.name[: -len(_FAILED_SUFFIX)] + ".jsonl"), path
    elif failed is None:
        failed = default_failed_path(path)
    if path.exists() and not path.is_file():
        raise InputError(f"{str(path)!r} is not a file: give the run's output file (the --output of mics run)")
    failed = failed if failed.is_file() else None
    if not output.is_file() and failed is None:
        raise InputError(
            f"output file {str(path)!r} not found, nor its failed file {default_failed_path(output).name!r}: "
            "give the --output of mics run"
        )
    return output, failed


def _is_failure_line(record: dict[str, Any]) -> bool:
    """A failed-file line (an ``error`` with a ``kind``, no ``gt_answer``), wherever it was found."""
    return foreign_failure(record) is None and foreign_success(record) is not None


def _outcomes(successes: _Numbered, failures: list[tuple[str, int, dict[str, Any]]], output: Path) -> tuple[_Numbered, _Numbered]:
    """One line per item by the journal's rule: a run still going, or stopped, may hold a retried item's
    old failure beside its new outcome. A line without an id gets its place in its file as one."""
    for number, record in successes:
        if not _text(record.get("rid")):
            record["rid"] = f"{output.name}:{number}"
    for file_name, number, record in failures:
        search = record.get("search") if isinstance(record.get("search"), dict) else {}
        line = record.get("line") if isinstance(record.get("line"), int) else None
        # A line without a usable id is shown by its line number (its key is made up: see data.made_up_key).
        record["rid"] = (_text(record.get("rid")) or _text(search.get("rid"))
                         or (f"line-{line}" if line is not None else f"{file_name}:{number}"))
    kept, kept_failures = winning_lines([success_line(record) for _, record in successes],
                                        [failure_key(record) for _, _, record in failures])
    return [successes[i] for i in kept], [failures[i][1:] for i in kept_failures]


def build_report_data(
    output: Path,
    failed: Path | None = None,
    *,
    image_dir: Path | None = None,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    title: str | None = None,
) -> ReportData:
    """Read a run's success file and failed file into the report's data. ``output`` may name either file of
    the run (``OUT.jsonl`` or ``OUT_failed.jsonl``); the other is found beside it unless ``failed`` is given.
    A run where nothing succeeded (no success file, or an empty one) is reported from its failed file. With
    ``image_dir`` each image the items name is embedded once as a small thumbnail.

    Raises :class:`InputError` if neither file of the run exists, or a failed file given explicitly is missing."""
    output, failed = run_files(output, failed)
    if image_dir is not None and not image_dir.is_dir():
        raise InputError(f"image folder {str(image_dir)!r} not found")

    warnings: list[str] = []
    bad_lines: list[int] = []
    if output.is_file():
        successes = list(_read_jsonl(output, warnings, bad_lines))
    else:
        successes = []
        warnings.append(f"{output.name} does not exist: no item of this run succeeded")
    failures = [(output.name, number, record) for number, record in successes if _is_failure_line(record)]
    if failures:
        # A failed file given as the success file, or lines moved between them: each counts as what it is.
        warnings.append(f"{output.name}: {len(failures)} line(s) are failures, not successes: counted by their kind")
        successes = [(number, record) for number, record in successes if not _is_failure_line(record)]
    if failed is not None:
        failures += [(failed.name, number, record) for number, record in _read_jsonl(failed, warnings, bad_lines)]
    successes, failures = _outcomes(successes, failures, output)
    builder = _Builder()
    for _, record in successes:
        builder.add("success", record)
    for _, record in failures:
        error = record.get("error") if isinstance(record.get("error"), dict) else {}
        kind = _text(error.get("kind")) or "unknown"
        search = record.get("search") if isinstance(record.get("search"), dict) else {}
        builder.add(
            kind, {**search, "rid": record["rid"]}, line=record.get("line") if isinstance(record.get("line"), int) else None,
            error=_text(error.get("message")), raw_input=failure_input(record), has_input=True,
        )

    images: dict[str, str | None] = {}
    if image_dir is not None:
        paths = list(dict.fromkeys(path for item in builder.items for path in item["img"]))
        images = _thumbnails(paths, image_dir, thumbnail_size, warnings)

    return ReportData(
        title=title or f"MICS report: {output.name}",
        sources={"output": output.name if output.is_file() else None, "failed": failed.name if failed else None,
                 "image_dir": str(image_dir) if image_dir is not None else None},
        summary=builder.summary(len(bad_lines)),
        mentors=list(builder.mentors),
        interns=list(builder.interns),
        items=builder.items,
        images=images,
        warnings=warnings,
    )
