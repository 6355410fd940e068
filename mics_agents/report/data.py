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

A run's files are read twice, as ``mics merge`` reads shards: a first pass keeps each item's key and where its
standing line is (a few numbers an item), a second reads those lines one at a time into the summary and hands
each item on. So memory stays flat in the number of items: :func:`stream_report_data` (what the page is
written from) never holds them; :func:`build_report_data` collects them in a list, for tests and small runs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import failure_input
from ..dataset.steps import StepStats, count_tree
from ..errors import ImageError, InputError
from ..images import DEFAULT_MAX_PIXELS, decode_budget, decode_cost, to_8bit
from ..outputs import Line, default_failed_path, failure_key, foreign_failure, foreign_success, success_line, winning_lines

__all__ = ["ReportData", "ReportItems", "StreamedReport", "build_report_data", "stream_report_data", "run_files", "STATUSES", "DEFAULT_THUMBNAIL_SIZE"]

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
    # A list from build_report_data; from write_report, a ReportItems that reads them again from the files.
    items: Sequence[dict[str, Any]]
    images: dict[str, str | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def head(self) -> dict[str, Any]:
        """What the page embeds before the items."""
        return {
            "version": 1,
            "title": self.title,
            "sources": self.sources,
            "summary": self.summary,
            "mentors": self.mentors,
            "interns": self.interns,
            "statuses": list(self.summary["status"]),
        }

    def payload(self) -> dict[str, Any]:
        """What the page embeds (as JSON)."""
        return {**self.head(), "items": list(self.items), "images": self.images, "warnings": self.warnings}


def _read_jsonl(path: Path, warnings: list[str], bad_lines: list[int]) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """(line number, start, end, object) of each JSON object of a file, ``start``/``end`` its bytes; a line
    that is not one is counted in ``bad_lines``, not fatal (a run that is still going can leave a torn last
    line)."""
    first_bad = len(bad_lines)
    with open(path, "rb") as handle:
        offset = 0
        for number, raw_line in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw_line)
            if not raw_line.strip():
                continue
            record = _decode(raw_line)
            if record is None:
                bad_lines.append(number)
                continue
            yield number, start, offset, record
    skipped = bad_lines[first_bad:]
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.append(f"{path.name}: skipped {len(skipped)} line(s) that are not JSON objects (line {shown})")


def _decode(raw_line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw_line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


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
    """Adds up the summary as items come, and hands each item to ``sink`` (it keeps none of them): the
    summary, the mentor and intern tables and the image paths grow with what the run names, not with how many
    items it has."""

    def __init__(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self.sink = sink
        self.count = 0
        self.image_paths: dict[str, None] = {}  # every image path the items name, once, in order
        self.mentors: dict[str, int] = {}
        self.interns: dict[str, int] = {}
        self.mentor_names: list[str] = []
        self.intern_names: list[str] = []
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
        item: dict[str, Any] = {"i": self.count, "rid": _text(record.get("rid")), "status": status}
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
        self.image_paths.update(dict.fromkeys(images))
        self.count += 1
        self.sink(item)

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
            "items": self.count,
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


# Thumbnails made at a time: the threads overlap, and no more of them than this waits in memory.
_THUMBNAIL_BATCH = 64


def _thumbnails(paths: list[str], image_dir: Path, size: int, warnings: list[str]) -> Iterator[tuple[str, str | None]]:
    """(path, thumbnail data URL or None) of each path, in order, made a batch at a time; once all are
    given, what could not be shown is added to ``warnings``."""
    from PIL import Image

    def one(relative: str) -> str | bool | None:
        try:
            path = _inside(image_dir, relative)
            if path is None:
                return None
            return thumbnail_data_url(path, size, max_pixels=DEFAULT_MAX_PIXELS)
        except ImageError:
            return False  # above the pixel cap
        except (OSError, ValueError, SyntaxError, EOFError, RuntimeError, MemoryError, Image.DecompressionBombError):
            return None

    # How many could not be shown, and the first of them (to name in the warning).
    missing: list[Any] = [0, None]
    too_large: list[Any] = [0, None]
    # Threads overlap file reads and decodes; the decode budget bounds how much memory they hold at once.
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding and resizing release the GIL
        for first in range(0, len(paths), _THUMBNAIL_BATCH):
            batch = paths[first:first + _THUMBNAIL_BATCH]
            for path, url in zip(batch, pool.map(one, batch)):
                if not isinstance(url, str):
                    tally = too_large if url is False else missing
                    tally[0] += 1
                    tally[1] = tally[1] if tally[0] > 1 else path
                    url = None
                yield path, url
    if missing[0]:
        warnings.append(
            f"{missing[0]} of {len(paths)} image(s) not found or unreadable under {image_dir} (e.g. {missing[1]})"
        )
    if too_large[0]:
        warnings.append(
            f"{too_large[0]} image(s) above {DEFAULT_MAX_PIXELS:,} pixels shown without a thumbnail "
            f"(e.g. {too_large[1]}): a run refuses them too"
        )


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


def _name_success(record: dict[str, Any], output: Path, number: int) -> dict[str, Any]:
    """A success line without an id gets its place in its file as one."""
    if not _text(record.get("rid")):
        record["rid"] = f"{output.name}:{number}"
    return record


def _name_failure(record: dict[str, Any], file_name: str, number: int) -> dict[str, Any]:
    search = record.get("search") if isinstance(record.get("search"), dict) else {}
    line = record.get("line") if isinstance(record.get("line"), int) else None
    # A line without a usable id is shown by its line number (its key is made up: see data.made_up_key).
    record["rid"] = (_text(record.get("rid")) or _text(search.get("rid"))
                     or (f"line-{line}" if line is not None else f"{file_name}:{number}"))
    return record


@dataclass
class _RunScan:
    """Where the standing line of each item of a run is, by the journal's rule (a run still going, or
    stopped, may hold a retried item's old failure beside its new outcome): what the first pass over the
    files keeps, a few numbers per item. The second pass reads those lines, one at a time.

    ``files`` are the files read and the identity each had (a run that compacts one between the passes
    replaces it). ``successes`` holds (line number, start, end) of each standing success line of the
    output; ``failures`` (file, line number, start, end) of each standing failure line, the output's own
    (failure lines found there) first."""

    output: Path
    failed: Path | None
    files: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)
    successes: array = field(default_factory=lambda: array("q"))
    failures: array = field(default_factory=lambda: array("q"))
    warnings: list[str] = field(default_factory=list)
    unreadable: int = 0


def _identity(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_dev, found.st_ino


def _scan_run(output: Path, failed: Path | None) -> _RunScan:
    """The first pass: each line's item and where its bytes are; the records are decoded one at a time and
    dropped."""
    scan = _RunScan(output, failed)
    bad_lines: list[int] = []
    success_lines: list[Line] = []
    success_places = array("q")
    failure_keys: list[str | None] = []
    failure_places = array("q")
    moved = 0  # failure lines in the success file
    if output.is_file():
        scan.files.append((output, _identity(output)))
        for number, start, end, record in _read_jsonl(output, scan.warnings, bad_lines):
            if _is_failure_line(record):
                moved += 1
                failure_keys.append(failure_key(_name_failure(record, output.name, number)))
                failure_places.extend((0, number, start, end))
            else:
                success_lines.append(success_line(_name_success(record, output, number)))
                success_places.extend((number, start, end))
    else:
        scan.warnings.append(f"{output.name} does not exist: no item of this run succeeded")
    if moved:
        # A failed file given as the success file, or lines moved between them: each counts as what it is.
        scan.warnings.append(f"{output.name}: {moved} line(s) are failures, not successes: counted by their kind")
    if failed is not None:
        scan.files.append((failed, _identity(failed)))
        for number, start, end, record in _read_jsonl(failed, scan.warnings, bad_lines):
            failure_keys.append(failure_key(_name_failure(record, failed.name, number)))
            failure_places.extend((len(scan.files) - 1, number, start, end))
    scan.unreadable = len(bad_lines)
    kept, kept_failures = winning_lines(success_lines, failure_keys)
    del success_lines, failure_keys
    for index in kept:
        scan.successes.extend(success_places[3 * index:3 * index + 3])
    for index in kept_failures:
        scan.failures.extend(failure_places[4 * index:4 * index + 4])
    return scan


class _Reader:
    """The second pass: the standing lines, read by their offsets from files that must be the ones the
    first pass read (a file that grew since is fine: a run still going only appends)."""

    def __init__(self, scan: _RunScan) -> None:
        self.scan = scan
        self.handles: dict[int, Any] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles.values():
            handle.close()

    def read(self, file: int, start: int, end: int) -> dict[str, Any]:
        path, identity = self.scan.files[file]
        handle = self.handles.get(file)
        if handle is None:
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                raise self._changed(path) from None
            found = os.fstat(handle.fileno())
            if (found.st_dev, found.st_ino) != identity:
                handle.close()
                raise self._changed(path)
            self.handles[file] = handle
        handle.seek(start)
        record = _decode(handle.read(end - start))
        if record is None:
            raise self._changed(path)
        return record

    @staticmethod
    def _changed(path: Path) -> InputError:
        return InputError(
            f"{path} changed while it was being read (a run compacted or rewrote it): nothing was written. "
            "Run mics report again (after the run ends, for a stable report)."
        )


def _standing(scan: _RunScan) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(status, record, keyword arguments of :meth:`_Builder.add`) of each item, successes first, each read
    when it is needed."""
    with _Reader(scan) as reader:
        places = scan.successes
        for at in range(0, len(places), 3):
            number, start, end = places[at:at + 3]
            yield "success", _name_success(reader.read(0, start, end), scan.output, number), {}
        places = scan.failures
        for at in range(0, len(places), 4):
            file, number, start, end = places[at:at + 4]
            record = _name_failure(reader.read(file, start, end), scan.files[file][0].name, number)
            error = record.get("error") if isinstance(record.get("error"), dict) else {}
            kind = _text(error.get("kind")) or "unknown"
            search = record.get("search") if isinstance(record.get("search"), dict) else {}
            yield kind, {**search, "rid": record["rid"]}, {
                "line": record.get("line") if isinstance(record.get("line"), int) else None,
                "error": _text(error.get("message")), "raw_input": failure_input(record), "has_input": True,
            }


def _build(scan: _RunScan, sink: Callable[[dict[str, Any]], None]) -> _Builder:
    builder = _Builder(sink)
    for status, record, details in _standing(scan):
        builder.add(status, record, **details)
    return builder


class ReportItems(Sequence):
    """The items of a run, read again from its files each time they are gone through (never all held)."""

    def __init__(self, scan: _RunScan, count: int) -> None:
        self._scan, self._count = scan, count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ready: list[dict[str, Any]] = []
        builder = _Builder(ready.append)
        for status, record, details in _standing(self._scan):
            builder.add(status, record, **details)
            yield from ready
            ready.clear()

    def __getitem__(self, index):  # type: ignore[override]
        return list(self)[index]


@dataclass
class StreamedReport:
    """What :func:`stream_report_data` read, and the parts of the page's data to write in order: ``head``
    (everything before the items), ``images`` (path, thumbnail) as they are made, then ``data.warnings``
    (complete once ``images`` is exhausted)."""

    data: ReportData
    head: dict[str, Any]
    images: Iterator[tuple[str, str | None]]


def stream_report_data(
    output: Path,
    failed: Path | None = None,
    *,
    sink: Callable[[dict[str, Any]], None],
    image_dir: Path | None = None,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    title: str | None = None,
) -> StreamedReport:
    """:func:`build_report_data` with memory flat in the number of items: the files are read twice (which
    line stands for each item, then those lines one at a time) and each item is handed to ``sink``, never
    kept. The returned data's ``items`` are read again from the files if gone through; its ``images`` are
    empty (the thumbnails come from the returned ``images`` iterator, once)."""
    output, failed = run_files(output, failed)
    if image_dir is not None and not image_dir.is_dir():
        raise InputError(f"image folder {str(image_dir)!r} not found")
    scan = _scan_run(output, failed)
    builder = _build(scan, sink)
    warnings = scan.warnings
    paths = list(builder.image_paths)
    images = _thumbnails(paths, image_dir, thumbnail_size, warnings) if image_dir is not None else iter(())
    data = ReportData(
        title=title or f"MICS report: {output.name}",
        sources={"output": output.name if output.is_file() else None, "failed": failed.name if failed else None,
                 "image_dir": str(image_dir) if image_dir is not None else None},
        summary=builder.summary(scan.unreadable),
        mentors=list(builder.mentors),
        interns=list(builder.interns),
        items=ReportItems(scan, builder.count),
        images={},
        warnings=warnings,
    )
    return StreamedReport(data, data.head(), images)


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

    Holds every item (and thumbnail) in memory: the page of a large run is written by
    :func:`~mics_agents.report.write_report`, which streams them.

    Raises :class:`InputError` if neither file of the run exists, or a failed file given explicitly is missing."""
    items: list[dict[str, Any]] = []
    streamed = stream_report_data(output, failed, sink=items.append, image_dir=image_dir,
                                  thumbnail_size=thumbnail_size, title=title)
    streamed.data.images = dict(streamed.images)
    streamed.data.items = items
    return streamed.data
