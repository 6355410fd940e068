"""The real ``mics run`` as a subprocess, driving the test's OpenAI-compatible server (issue 3).

Each test starts ``python -m mics_agents run ...`` with the models pointed at an :class:`OpenAIServer`
running in this process (its own thread), then kills, interrupts, shards, budgets or breaks it, and
checks the files a user is left with: exactly one whole JSON line per input item across ``OUT`` and
``OUT_failed``, equal to an uninterrupted run, and no model call paid for twice.

LiteLLM costs ~2-3 s to import in every subprocess, so launches are counted: one uninterrupted reference
run is shared by the tests that need a finished run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mics_agents.data import duplicate_key, made_up_key, shard_of

from .openai_server import OpenAIServer, RecordedRequest, simulated_brain_with_roles

MICS = [sys.executable, "-m", "mics_agents"]
SECRET = "sk-test"
RUN_TIMEOUT = 180.0  # no launch here needs more than a few seconds; this only stops a hang (generous: CI may be loaded)
SEED = "3"
# A reply the client read may be in flight inside the killed process (parsed, not yet committed to the
# cache): such a call may be sent again. Anything answered longer than this before a kill must not be.
IN_FLIGHT_WINDOW = 0.3


# -- the dataset ----------------------------------------------------------------------------------

FREE_TEXT = [
    ("a sudden pleuritic chest pain in a tall young smoker", "Left tension pneumothorax"),
    ("a ring-enhancing lesion after a dental procedure", "Brain abscess"),
    ("a target sign in the right lower quadrant of a toddler", "Ileocolic intussusception"),
    ("a crescent-shaped extra-axial collection after a fall", "Acute subdural haematoma"),
    ("air under the diaphragm after an endoscopy", "Bowel perforation"),
    ("a whirl sign in the sigmoid mesentery", "Sigmoid volvulus"),
    ("a double bubble on a newborn's radiograph", "Duodenal atresia"),
    ("a snowstorm uterus in the first trimester", "Complete hydatidiform mole"),
]
MULTIPLE_CHOICE = [
    ("a lung nodule", ["Central calcification", "Spiculated margin", "Size under 5 mm", "Stable for 3 years"], "B"),
    ("a liver lesion in cirrhosis", ["Washout with a capsule", "Rim only", "No arterial phase", "Fat content"], "A"),
    ("a renal mass", ["Simple cyst", "Angiomyolipoma with fat", "Enhancing solid component", "Milk of calcium"], "C"),
    ("a thyroid nodule", ["Spongiform", "Comet-tail artefact", "Halo", "Taller than wide"], "D"),
    ("a bone lesion", ["Sclerotic rim", "Permeative pattern", "Narrow zone", "No matrix"], "B"),
    ("a breast mass", ["Oval", "Circumscribed", "Parallel", "Irregular with spiculation"], "D"),
]


@dataclass
class Dataset:
    path: Path
    image_dir: Path
    keys: list[str]


def write_png(path: Path, width: int, height: int, seed: int) -> None:
    """A small real PNG whose pixels differ by ``seed`` (so every case has its own image hash)."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([(rng.randrange(256), (x * 7 + seed) % 256, 90) for x in range(width * height)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def chiron_record(rid: str, question: str, answer: str, images: list[str], index: int) -> dict:
    return {
        "rid": rid,
        "messages": [
            {"role": "user", "content": f"**Question:** {question}"},
            {"role": "assistant", "content": f"**Correct Answer:** {answer}"},
        ],
        "images": images,
        "presentation": f"Patient {index} presents to the emergency department.",
        "age_label": str(30 + index),
        "gender_label": "Female" if index % 2 else "Male",
        "caption": [f"<image> Study {index}: the key finding is visible." for _ in images],
    }


def plain_record(rid: str, question: str, answer: str, images: list[str], index: int) -> dict:
    return {
        "id": rid,
        "question": question,
        "answer": answer,
        "images": images,
        "case_info": {"presentation": f"Outpatient {index}.", "age_label": str(40 + index)}
        if index % 2
        else f"Outpatient {index}, referred for imaging.",
    }


def write_dataset(folder: Path) -> Dataset:
    """14 cases, half in the Chiron-o1 layout and half plain; free-text and multiple-choice questions;
    one or two images each."""
    image_dir = folder / "images"
    records = []
    cases = [(f"What is the most likely diagnosis for {finding}?", answer) for finding, answer in FREE_TEXT]
    for topic, options, letter in MULTIPLE_CHOICE:
        lines = "\n".join(f"{chr(65 + i)}. {option}" for i, option in enumerate(options))
        cases.append((f"Which feature of {topic} most suggests malignancy?\n{lines}", letter))
    for index, (question, answer) in enumerate(cases):
        images = [f"case{index:02d}/view{view}.png" for view in range(1 + (index % 4 == 0))]
        for view, image in enumerate(images):
            write_png(image_dir / image, 20 + index, 16 + view, seed=100 * index + view)
        make = chiron_record if index % 2 == 0 else plain_record
        records.append(make(f"{'chiron' if index % 2 == 0 else 'plain'}-{index:02d}", question, answer, images, index))
    path = folder / "cases.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return Dataset(path, image_dir, [record.get("rid", record.get("id")) for record in records])


# -- running mics ---------------------------------------------------------------------------------


# USD per token, as LiteLLM's table has them for these names.
PRICES = json.dumps({"openai/gpt-4o": {"input": 2.5e-6, "output": 1e-5},
                     "openai/gpt-4o-mini": {"input": 1.5e-7, "output": 6e-7}})


def mics_env(server: OpenAIServer, **variables: str) -> dict[str, str]:
    """The machine's environment without its MICS_* and provider variables, pointed at ``server``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MICS_") and not name.endswith(("_API_KEY", "_API_BASE", "_BASE_URL"))
    }
    env.update(
        MICS_MENTORS="openai/mentor-a,openai/mentor-b",
        MICS_INTERNS="openai/intern-1,openai/intern-2",
        MICS_JUDGE="openai/judge",
        OPENAI_API_BASE=server.base_url,
        OPENAI_API_KEY=SECRET,
        MICS_RETRY_INITIAL_WAIT="0.01",
        MICS_RETRY_MAX_WAIT="0.05",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        COLUMNS="400",  # rich wraps stderr at 80 columns otherwise, splitting the messages checked here
    )
    env.update(variables)
    return env


def run_args(data: Dataset, output: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "run", str(data.path), "--image-dir", str(data.image_dir), "--output", str(output),
        "--cache", str(cache), "--concurrency", "4", "--seed", SEED, *extra,
    ]


def run_mics(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*MICS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def flat(text: str) -> str:
    """Whitespace collapsed, so a message reads the same however the console wrapped it."""
    return " ".join(text.split())


@dataclass
class Launched:
    """A ``mics`` subprocess running in the background, its output going to files."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        return self.process.wait(timeout=timeout)

    def err(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """Start ``mics`` subprocesses; any still running when the test ends is killed (by its pid)."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], env: dict[str, str], *, name: str = "mics") -> Launched:
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        number = len(started)
        stdout, stderr = logs / f"{name}-{number}.out", logs / f"{name}-{number}.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            process = subprocess.Popen([*MICS, *args], env=env, cwd=tmp_path, stdout=out, stderr=err)
        started.append(process)
        return Launched(process, stdout, stderr)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


# -- reading what a run left ----------------------------------------------------------------------


def failed_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + "_failed.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a run's file: whole (newline-terminated) and valid JSON; a missing file is empty."""
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends with a torn line: {data[-80:]!r}"
    records = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{path.name}:{number} is not valid JSON ({exc.msg}): {line[:120]!r}") from None
    return records


def lines_by_item(output: Path) -> dict[str, dict]:
    """The lines of ``OUT`` and ``OUT_failed`` by item key; fails on an item with two lines."""
    by_key: dict[str, dict] = {}
    for path in (output, failed_path(output)):
        for record in read_jsonl(path):
            key = str(record.get("key", record["rid"]))
            assert key not in by_key, f"item {key!r} has more than one line ({path.name})"
            by_key[key] = record
    return by_key


def without_usage(records: dict[str, dict]) -> dict[str, dict]:
    """Records as a run's result, without what differs between a fresh and a replayed run (usage)."""
    stripped = {}
    for key, record in records.items():
        record = {name: value for name, value in record.items() if name != "usage"}
        if "search" in record:
            record["search"] = {name: value for name, value in record["search"].items() if name != "usage"}
        stripped[key] = record
    return stripped


def kinds(records: dict[str, dict]) -> dict[str, str]:
    return {key: record["error"]["kind"] if "error" in record else "success" for key, record in records.items()}


def answered(requests: list[RecordedRequest], *, after: float = float("-inf"), before: float = float("inf")) -> set[str]:
    """The calls (canonical forms) received after ``after`` and answered successfully before ``before``."""
    return {
        request.canonical()
        for request in requests
        if request.status == 200
        and request.received_at > after
        and request.replied_at is not None
        and request.replied_at < before
    }


# -- the shared uninterrupted run -----------------------------------------------------------------


@dataclass
class Reference:
    data: Dataset
    output: Path
    cache: Path
    requests: list[RecordedRequest] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The dataset, run once start to finish on a fresh cache: what every resumed run must equal."""
    folder = tmp_path_factory.mktemp("reference")
    data = write_dataset(folder / "data")
    output, cache = folder / "out.jsonl", folder / "cache.sqlite"
    with OpenAIServer(lifetime=120) as server:
        result = run_mics(run_args(data, output, cache), mics_env(server), folder)
        requests = server.recorded()
        assert server.errors == []
    assert result.returncode == 0, result.stderr
    records = lines_by_item(output)
    assert sorted(records) == sorted(data.keys)
    # A meaningful reference: most items succeed, every request was answered, none was sent twice.
    assert list(kinds(records).values()).count("success") >= len(data.keys) // 2
    assert requests and all(request.status == 200 for request in requests)
    assert len(answered(requests)) == len(requests)
    return Reference(data, output, cache, requests, records)


# -- 1. kill -9 at three random moments -----------------------------------------------------------


def test_sigkill_at_three_random_moments_then_resume_equals_an_uninterrupted_run(reference, tmp_path, launch):
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = run_args(reference.data, output, cache)
    full = len(reference.requests)
    # Three increasing moments, one in each part of the run (counted in requests the server has seen).
    rng = random.Random(20250611)
    thresholds = [rng.randrange(full * low // 20, full * high // 20) for low, high in ((2, 7), (8, 12), (13, 18))]
    kills: list[float] = []

    with OpenAIServer(latency=(0.05, 0.15), latency_seed=5, lifetime=120) as server:
        env = mics_env(server)
        for threshold in thresholds:
            running = launch(args, env, name="killed")
            wait_until(
                lambda: server.count() >= threshold or running.process.poll() is not None,
                timeout=RUN_TIMEOUT,
                what=f"{threshold} requests",
            )
            assert running.process.poll() is None, f"the run ended before its kill at {threshold}: {running.err()}"
            kills.append(time.monotonic())
            running.process.send_signal(signal.SIGKILL)
            assert running.wait(10) == -signal.SIGKILL
        final = run_mics(args, env, tmp_path)
        requests = server.recorded()
        assert server.errors == []

    assert final.returncode == 0, final.stderr
    # Exactly one whole line per item, and the same records as the uninterrupted run.
    records = lines_by_item(output)
    assert sorted(records) == sorted(reference.data.keys)
    assert without_usage(records) == without_usage(reference.records)

    # No call a killed session had its answer to (before the in-flight window) was sent again later.
    resent_in_flight = checked = 0
    for started, killed_at in zip([float("-inf"), *kills], kills):
        settled = answered(requests, after=started, before=killed_at - IN_FLIGHT_WINDOW)
        in_flight = answered(requests, after=started, before=killed_at) - settled
        later = [request.canonical() for request in requests if request.received_at > killed_at]
        checked += len(settled)
        repeated = [call for call in later if call in settled]
        assert repeated == [], f"{len(repeated)} call(s) answered before a kill were paid for again"
        resent_in_flight += sum(call in in_flight for call in later)
    # (A handful suffices; how many depends on the machine's speed, since the kills come at request counts.)
    assert checked >= 3, "the kills should come after calls whose answers had long been cached"
    # The killed sessions together cost at most the calls in flight at the kills, beyond a full run.
    assert full <= len(requests) <= full + resent_in_flight + 3 * 4 * 8
    # Together the sessions made exactly the calls of the full run.
    assert answered(requests) == answered(reference.requests)


# -- 2. a torn last line ---------------------------------------------------------------------------


def test_a_torn_last_line_is_cut_and_nothing_is_sent_again(reference, tmp_path):
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    shutil.copy(reference.output, output)
    if failed_path(reference.output).exists():
        shutil.copy(failed_path(reference.output), failed_path(output))
    shutil.copy(reference.cache, cache)
    whole = output.read_bytes()
    first = json.loads(whole.splitlines()[0])
    torn = json.dumps(dict(first, rid="torn-by-a-crash")).encode()
    with open(output, "ab") as handle:
        handle.write(torn[: len(torn) // 2])

    with OpenAIServer(lifetime=60) as server:
        result = run_mics(run_args(reference.data, output, cache), mics_env(server), tmp_path)
        sent = server.count()

    assert result.returncode == 0, result.stderr
    assert output.read_bytes() == whole  # exactly the torn bytes are gone
    assert re.search(r"torn lines repaired\W+1\b", result.stderr)
    records = lines_by_item(output)
    assert sorted(records) == sorted(reference.data.keys)
    assert without_usage(records) == without_usage(reference.records)
    assert sent == 0


# -- 3. two shards, one cache file -----------------------------------------------------------------


def test_two_shard_processes_share_one_cache_file_and_merge(reference, tmp_path, launch):
    data = reference.data
    cache = tmp_path / "shared.sqlite"
    outputs = [tmp_path / "shard0.jsonl", tmp_path / "shard1.jsonl"]
    with OpenAIServer(latency=0.01, lifetime=120) as server:
        env = mics_env(server)
        shards = [
            launch(run_args(data, outputs[index], cache, "--shard", f"{index}/2"), env, name=f"shard{index}")
            for index in range(2)
        ]
        codes = [shard.wait() for shard in shards]
        sent = server.recorded()

    for shard, code in zip(shards, codes):
        assert code == 0, shard.err()
        assert "database is locked" not in flat(shard.err()).lower()
    shard_keys = [set(lines_by_item(output)) for output in outputs]
    # A partition by the hash of the item id: each item in exactly one shard, together all of them.
    assert shard_keys[0] and shard_keys[1] and not shard_keys[0] & shard_keys[1]
    assert shard_keys[0] | shard_keys[1] == set(data.keys)
    assert shard_keys[0] == {key for key in data.keys if shard_of(key, 2) == 0}
    # Same records as one unsharded run, and the shared cache made no call twice.
    merged_records = {**lines_by_item(outputs[0]), **lines_by_item(outputs[1])}
    assert without_usage(merged_records) == without_usage(reference.records)
    assert len({request.canonical() for request in sent}) == len(sent) == len(reference.requests)
    with sqlite3.connect(cache) as db:  # both wrote their calls to the one file
        assert db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == len(sent)

    plain_env = {**os.environ, "COLUMNS": "400"}  # merge needs no models
    merged = tmp_path / "all.jsonl"
    result = run_mics(["merge", str(outputs[0]), str(outputs[1]), "--output", str(merged)], plain_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert without_usage(lines_by_item(merged)) == without_usage(reference.records)

    overlap = tmp_path / "overlap.jsonl"
    refused = run_mics(["merge", str(outputs[0]), str(outputs[0]), "--output", str(overlap)], plain_env, tmp_path)
    assert refused.returncode != 0
    assert "--dedupe" in flat(refused.stderr) and "appear in more than one input" in flat(refused.stderr)
    assert not overlap.exists()
    dedupe = ["merge", str(outputs[0]), str(outputs[0]), "--output", str(overlap), "--dedupe"]
    deduped = run_mics(dedupe, plain_env, tmp_path)
    assert deduped.returncode == 0, deduped.stderr
    assert lines_by_item(overlap) == lines_by_item(outputs[0])


# -- 4. the budget ---------------------------------------------------------------------------------

PRICED_ROLES = {"gpt-4o": "mentor", "gpt-4o-mini": "mentor", "intern-1": "intern", "intern-2": "intern", "judge": "judge"}


def test_budget_stops_new_items_and_a_larger_budget_continues(reference, tmp_path):
    data = reference.data
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = run_args(data, output, cache)
    args[args.index("--concurrency") + 1] = "2"
    with OpenAIServer(simulated_brain_with_roles(PRICED_ROLES), lifetime=120) as server:
        # Mentors with prices (MICS_PRICES, since the direct client reaches the local server), so calls cost something.
        env = mics_env(server, MICS_MENTORS="openai/gpt-4o,openai/gpt-4o-mini", MICS_PRICES=PRICES)
        stopped = run_mics([*args, "--budget-usd", "0.0001", "--json-summary", str(tmp_path / "s1.json")], env, tmp_path)
        first_session = server.recorded()
        first_lines = lines_by_item(output)
        server.reset()
        resumed = run_mics([*args, "--budget-usd", "100", "--json-summary", str(tmp_path / "s2.json")], env, tmp_path)
        second_session = server.recorded()
        assert server.errors == []

    assert stopped.returncode == 3, stopped.stderr
    assert "Budget of $0.0001 reached" in flat(stopped.stderr) and "--budget-usd" in flat(stopped.stderr)
    summary = json.loads((tmp_path / "s1.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["spent_usd"] >= 0.0001
    # Only the items in flight when the budget ran out (two: --concurrency 2) were started and finished.
    assert len(first_lines) == 2 and summary["not_started"] == len(data.keys) - 2

    assert resumed.returncode == 0, resumed.stderr
    records = lines_by_item(output)
    assert sorted(records) == sorted(data.keys)
    assert {key: records[key] for key in first_lines} == first_lines  # kept as they were
    assert json.loads((tmp_path / "s2.json").read_text())["already_done"] == 2
    costs = [record["usage"]["cost_usd"] for record in records.values() if "usage" in record]
    assert costs and all(cost > 0 for cost in costs)
    assert not answered(first_session) & {request.canonical() for request in second_session}


# -- 5. configuration errors and the bad-input corpus ----------------------------------------------


def test_configuration_errors_exit_2(reference, tmp_path):
    data = reference.data
    with OpenAIServer(lifetime=60) as server:
        env = mics_env(server)
        without_mentors = {name: value for name, value in env.items() if name != "MICS_MENTORS"}
        no_mentors = run_mics(run_args(data, tmp_path / "a.jsonl", tmp_path / "c.sqlite"), without_mentors, tmp_path)
        bad_shard = run_mics(run_args(data, tmp_path / "b.jsonl", tmp_path / "c.sqlite", "--shard", "3/2"), env, tmp_path)
        assert server.count() == 0
    assert no_mentors.returncode == 2 and "MICS_MENTORS" in flat(no_mentors.stderr)
    assert bad_shard.returncode == 2 and "--shard must be I/N" in flat(bad_shard.stderr) and "'3/2'" in bad_shard.stderr
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_bad_input_corpus_becomes_bad_input_lines_and_the_run_goes_on(tmp_path):
    image_dir = tmp_path / "images"
    write_png(image_dir / "ok.png", 24, 24, seed=1)
    write_png(image_dir / "wide.png", 100, 40, seed=2)  # longer side above MICS_IMAGE_MAX_SIDE, under the cap
    write_png(image_dir / "huge.png", 80, 80, seed=3)  # 6,400 pixels: above MICS_IMAGE_MAX_PIXELS
    write_png(tmp_path / "outside.png", 24, 24, seed=4)  # exists, but outside --image-dir
    (image_dir / "truncated.png").write_bytes((image_dir / "ok.png").read_bytes()[:60])
    (image_dir / "notes.png").write_bytes(b"this is a text file, not an image\n")

    def plain(rid: str, images: list[str], **fields) -> str:
        record = {"id": rid, "question": f"What is the most likely diagnosis for case {rid}?", "answer": "Brain abscess"}
        record.update(images=images, **fields)
        return json.dumps({k: v for k, v in record.items() if v is not None})

    ring = "What is the most likely diagnosis for the ring lesion?"
    lines = [  # numbered as the file's lines
        json.dumps(chiron_record("ok-1", ring, "Brain abscess", ["ok.png"], 1)),  # 1
        '{"id": "broken", "question": "What?"',  # 2: invalid JSON
        '["a", "list", "not", "an", "object"]',  # 3
        plain("no-question", ["ok.png"], question=None),  # 4
        json.dumps(chiron_record("no-answer", "What is shown?", "", ["ok.png"], 5)),  # 5
        "",  # 6: blank, skipped (but counted in line numbers)
        plain("missing-image", ["scans/nope.png"]),  # 7
        plain("escapes", ["../outside.png"]),  # 8
        plain("truncated", ["truncated.png"]),  # 9
        plain("not-an-image", ["notes.png"]),  # 10
        plain("too-big", ["huge.png"]),  # 11
        plain("wide-image", ["wide.png"]),  # 12: downscaled
        plain("ok-1", ["ok.png"]),  # 13: duplicate id
    ]
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"

    with OpenAIServer(lifetime=60) as server:
        env = mics_env(server, MICS_IMAGE_MAX_PIXELS="5000", MICS_IMAGE_MAX_SIDE="64")
        args = ["run", str(data), "--image-dir", str(image_dir), "--output", str(output), "--seed", SEED]
        result = run_mics([*args, "--cache", str(tmp_path / "c.sqlite")], env, tmp_path)
        requests = server.recorded()
        assert server.errors == []

    assert result.returncode == 0, result.stderr
    records = lines_by_item(output)
    expected_bad = {
        made_up_key(2): ["line 2:", "invalid JSON"],
        made_up_key(3): ["line 3:", "expected a JSON object, got list"],
        "no-question": ["line 4:", "field 'question' is missing or empty"],
        "no-answer": ["line 5:", "field 'messages[1].content' is missing or empty"],
        "missing-image": ["line 7:", "image 'scans/nope.png' not found"],
        "escapes": ["line 8:", "image '../outside.png' points outside the image folder", "refused"],
        "truncated": ["line 9:", "image 'truncated.png' is corrupt and cannot be decoded"],
        "not-an-image": ["line 10:", "image 'notes.png' is not a supported image file"],
        "too-big": ["line 11:", "image 'huge.png' is 80x80 = 6,400 pixels, above the cap of 5,000 (MICS_IMAGE_MAX_PIXELS)"],
        duplicate_key("ok-1", 13): ["line 13:", "duplicate id 'ok-1' (first seen on line 1)"],
    }
    assert sorted(records) == sorted([*expected_bad, "ok-1", "wide-image"])
    for key, fragments in expected_bad.items():
        record = records[key]
        assert record["error"]["kind"] == "bad_input", (key, record["error"])
        message = record["error"]["message"]
        assert message.startswith(fragments[0]), (key, message)
        for fragment in fragments[1:]:
            assert fragment in message, (key, message)
    assert records[made_up_key(2)]["input"] == lines[1]  # the raw text is kept for the person fixing it
    # An object's fields sit beside "error", so the fixed file can be fed back to mics run.
    assert records["no-answer"]["rid"] == "no-answer" and "messages" in records["no-answer"]
    # The good items ran (with these texts the simulated search succeeds); the wide image was sent
    # downscaled to 64 px on its longer side.
    assert kinds(records)["ok-1"] == kinds(records)["wide-image"] == "success"
    assert records["wide-image"]["images"] == ["wide.png"]
    wide = [request for request in requests if "case wide-image" in request.text() and not request.model == "judge"]
    assert wide and {image_size(request) for request in wide} == {(64, 26)}
    assert re.search(r"bad_input\W+10\b", result.stderr)  # the summary counts them


def image_size(request: RecordedRequest) -> tuple[int, int]:
    import base64
    import io

    from PIL import Image

    urls = [
        part["image_url"]["url"]
        for message in request.body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]
    assert len(urls) == 1
    return Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))).size


# -- 6. model errors are retried on the next run ----------------------------------------------------


def test_model_errors_are_retried_on_the_next_run(reference, tmp_path):
    data = reference.data
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = run_args(data, output, cache)
    with OpenAIServer(lifetime=120) as server:
        env = mics_env(server, MICS_MAX_RETRIES="1")
        server.inject("500", model="intern-2", times=None)
        failing = run_mics(args, env, tmp_path)
        after_failing = lines_by_item(output)
        first_session = server.recorded()
        server.reset()  # healthy again
        rerun = run_mics(args, env, tmp_path)
        second_session = server.recorded()
        assert server.errors == []

    assert failing.returncode == 0, failing.stderr
    assert sorted(after_failing) == sorted(data.keys)
    assert set(kinds(after_failing).values()) == {"model_error"}
    message = after_failing[data.keys[0]]["error"]["message"]
    assert "openai/intern-2" in message and "HTTP 500" in message and "retried on the next run" in message
    assert {r.status for r in first_session if r.model == "intern-2"} == {500}

    assert rerun.returncode == 0, rerun.stderr
    records = lines_by_item(output)
    assert sorted(records) == sorted(data.keys)
    assert "model_error" not in kinds(records).values()
    assert without_usage(records) == without_usage(reference.records)
    # What succeeded in the failing run (mentors, intern-1, the judge) came from the cache.
    assert not answered(first_session) & {request.canonical() for request in second_session}


# -- 7. Ctrl-C -------------------------------------------------------------------------------------


def test_sigint_lets_items_in_flight_finish_then_exits_130(reference, tmp_path, launch):
    data = reference.data
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = run_args(data, output, cache)
    with OpenAIServer(latency=0.2, lifetime=120) as server:
        env = mics_env(server)
        running = launch(args, env, name="interrupted")
        wait_until(
            lambda: server.count() >= 2 or running.process.poll() is not None, timeout=RUN_TIMEOUT, what="the first requests"
        )
        assert running.process.poll() is None, running.err()
        running.process.send_signal(signal.SIGINT)
        code = running.wait()
        interrupted_lines = lines_by_item(output)
        server.latency = 0.02
        rerun = run_mics(args, env, tmp_path)
        assert server.errors == []

    assert code == 130, running.err()
    assert "Interrupted. Rerun the same command to resume." in flat(running.err())
    # The four items in flight (--concurrency 4) finished and were written whole; no other item started.
    assert len(interrupted_lines) == 4
    assert rerun.returncode == 0, rerun.stderr
    records = lines_by_item(output)
    assert sorted(records) == sorted(data.keys)
    assert without_usage(records) == without_usage(reference.records)


# -- 8. one owner per output (issue 13) --------------------------------------------------------------


def test_a_second_run_on_the_same_output_exits_2_naming_the_holder(reference, tmp_path, launch):
    import socket

    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    lock = output.with_name("out.jsonl.lock")
    args = run_args(reference.data, output, cache)
    with OpenAIServer(latency=0.05, lifetime=120) as server:
        env = mics_env(server)
        first = launch(args, env, name="owner")
        wait_until(lambda: first.process.poll() is not None or (lock.exists() and b"pid" in lock.read_bytes()),
                   timeout=RUN_TIMEOUT, what="the first run to take the lock")
        started = time.monotonic()
        second = run_mics(args, env, tmp_path)
        refused_in = time.monotonic() - started
        assert first.process.poll() is None, "the first run must still be going when the second starts"
        code = first.wait()
        assert server.errors == []

    assert second.returncode == 2, second.stderr
    said = flat(second.stderr)
    assert f"pid {first.process.pid} on {socket.gethostname()}, started" in said and "another --output" in said
    assert refused_in < 30, "refused at once, not after waiting"
    assert code == 0, first.err()
    # The files are exactly those of one run: one line per item, the reference's records.
    records = lines_by_item(output)
    assert sorted(records) == sorted(reference.data.keys)
    assert without_usage(records) == without_usage(reference.records)


# -- 9. a journal that only appends (issue 13) --------------------------------------------------------

# Mentors and an intern with prices, so that a budget can stop a rerun part-way. The test server is a local
# endpoint, which MICS_TRANSPORT=auto reaches with the direct client: MICS_PRICES gives the prices there.
JOURNAL_ROLES = {"gpt-4o": "mentor", "mentor-b": "mentor", "gpt-4o-mini": "intern", "intern-2": "intern", "judge": "judge"}
JOURNAL_MODELS = {"MICS_MENTORS": "openai/gpt-4o,openai/mentor-b", "MICS_INTERNS": "openai/gpt-4o-mini,openai/intern-2",
                  "MICS_MAX_RETRIES": "1", "MICS_PRICES": PRICES}


def whole_lines(path: Path) -> list[bytes]:
    """The whole lines of a file, as a reader sees it while a run writes it (a last line still being
    written, or torn by a kill, is not one yet)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line.strip()]


def standing_keys(output: Path) -> set[str]:
    """Items with a line, by the rule every reader applies, as a reader sees the files while a run writes
    them. The failed file is read first: a compaction only drops a failure line after its item's success
    is on disk."""
    from mics_agents.outputs import settle

    failures = [json.loads(line) for line in whole_lines(failed_path(output))]
    successes, failures = settle([json.loads(line) for line in whole_lines(output)], failures)
    return {str(r["rid"]) for r in successes} | {str(r["key"]) for r in failures}


class Watcher:
    """Reads the files every few milliseconds while runs write them; remembers any moment an item had no line."""

    def __init__(self, output: Path, keys: list[str]) -> None:
        import threading

        self.output, self.keys = output, set(keys)
        self.looks = 0
        self.missing: list[set[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            lost = self.keys - standing_keys(self.output)
            if lost:
                self.missing.append(lost)
            self.looks += 1
            time.sleep(0.002)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sigkill_while_retrying_model_errors_never_loses_an_items_line(reference, tmp_path):
    data = reference.data
    output, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"
    args = run_args(data, output, cache)
    journal: list[tuple[str, int, int, bool]] = []  # (session, exit code, whole lines, a torn line left)
    summary = tmp_path / "summary.json"

    def session(name: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
        summary.unlink(missing_ok=True)
        result = run_mics([*args, "--json-summary", str(summary), *extra], env, tmp_path)
        files = [output, failed_path(output)]
        torn = any(not path.read_bytes().endswith(b"\n") for path in files if path.exists() and path.stat().st_size)
        journal.append((name, result.returncode, sum(len(whole_lines(path)) for path in files), torn))
        assert standing_keys(output) == set(data.keys), f"after {name}: an item lost its line ({journal})"
        return result

    def spent() -> float:
        return json.loads(summary.read_text())["spent_usd"]

    with OpenAIServer(simulated_brain_with_roles(JOURNAL_ROLES), lifetime=300) as server:
        env = mics_env(server, **JOURNAL_MODELS)
        server.inject("500", model="gpt-4o-mini", times=None)
        broken = session("broken", env, "--budget-usd", "100")  # (a budget makes the summary say what was spent)
        assert broken.returncode == 0, broken.stderr
        assert set(kinds(lines_by_item(output)).values()) == {"model_error"}
        first_failures = failed_path(output).read_bytes()
        server.reset()  # healthy from here on

        with Watcher(output, data.keys) as watcher:
            limited = session("--limit 3", env, "--limit", "3", "--budget-usd", "100")
            assert limited.returncode == 0, limited.stderr
            assert failed_path(output).read_bytes().startswith(first_failures), "no line is removed before it is replaced"
            # Over budget once the first retried item has paid for anything.
            budget = session("budget", env, "--budget-usd", f"{spent() + 1e-9:.10f}", "--concurrency", "1")
            assert budget.returncode == 3, budget.stderr
            assert failed_path(output).read_bytes().startswith(first_failures)
            # Killed between the 2nd line's write and its fsync, in the middle of a line, after the 3rd
            # line, between a compaction's write and its rename, and after its first rename.
            for point in ("write:2", "torn:1", "fsync:3", "compact-write:1", "compact-replace:1"):
                killed = session(point, mics_env(server, **JOURNAL_MODELS, MICS_TEST_KILL_AT=point))
                assert killed.returncode == -signal.SIGKILL, f"{point}: {killed.stderr}"
            final = session("final", env)
        assert server.errors == []

    assert final.returncode == 0, final.stderr
    assert watcher.looks > 50 and watcher.missing == [], watcher.missing[:3]
    # Every item ends with exactly one line, and no temporary file is left.
    records = lines_by_item(output)
    assert sorted(records) == sorted(data.keys) and "model_error" not in kinds(records).values()
    assert sorted(path.name for path in tmp_path.glob(".out*")) == []
    # Sessions, in order: the limit and budget stops appended and never compacted; the kill between a
    # compaction's write and its rename left the journal as it was; the final run compacted it.
    lines = {name: count for name, _, count, _ in journal}
    assert lines["--limit 3"] == len(data.keys) + 3 and lines["budget"] == lines["--limit 3"] + 1, journal
    assert lines["write:2"] == lines["budget"] + 2 and lines["fsync:3"] == lines["torn:1"] + 3, journal
    assert [name for name, _, _, torn in journal if torn] == ["torn:1"], journal
    assert lines["compact-write:1"] > len(data.keys), journal
    assert lines["final"] == len(data.keys), journal
