"""Against a real, already running vLLM server of a vision model, started by `mics serve` with a ``media_dir``:
images by reference (``file://`` URLs into the media folder) for interns, checked end to end.

Skipped unless a server is configured (``bash tests/vllm/run_e2e.sh`` starts one and sets these):

    MICS_TEST_VLLM_VISION_BASE    the vision server's OpenAI base URL, e.g. http://127.0.0.1:8001/v1   (required)
    MICS_TEST_VLLM_VISION_MODEL   its served model name                                            (required)
    MICS_TEST_VLLM_VISION_ROUTER  the Router config `mics serve` wrote (model_info.media_dir set)   (required)
    MICS_TEST_VLLM_VISION_INTERN  the intern's Router name [default: the Router's first name]
    MICS_TEST_VLLM_MEDIA_DIR      the server's --allowed-local-media-path [default: the Router's media_dir]
    MICS_TEST_VLLM_IMAGE_CASES    a cases JSONL with images [default: mics_agents/examples/cases.jsonl]
    MICS_TEST_VLLM_VISION_LOG     the server's log (its access lines are counted into the report)
    MICS_TEST_VLLM_REPORT         a JSON file the tests add their wall times and counts to

`mics run` goes over the image cases with the interns on the served model through the Router config, and
mentors and judge on a scripted OpenAI-compatible stub in this process (a random model writes no steps, so
interns would never be called). The interns' requests pass through a recording proxy in this process (the
Router config's api_base is pointed at it, everything else as `mics serve` wrote it), so the tests see every
image URL that went to vLLM and every status vLLM answered with. The same run with the deployment declared to
read no folder (``model_info.media_dir: null``) sends data URLs: its image bytes, cache keys and (greedy,
temperature 0) answers must be those of the file:// run.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Read now: the suite's autouse fixture removes every MICS_* variable before each test.
BASE = os.environ.get("MICS_TEST_VLLM_VISION_BASE", "").rstrip("/")
MODEL = os.environ.get("MICS_TEST_VLLM_VISION_MODEL", "")
ROUTER = os.environ.get("MICS_TEST_VLLM_VISION_ROUTER", "")
INTERN = os.environ.get("MICS_TEST_VLLM_VISION_INTERN", "")
MEDIA = os.environ.get("MICS_TEST_VLLM_MEDIA_DIR", "")
CASES = os.environ.get("MICS_TEST_VLLM_IMAGE_CASES", "")
LOG = os.environ.get("MICS_TEST_VLLM_VISION_LOG", "")
REPORT = os.environ.get("MICS_TEST_VLLM_REPORT", "")

if not (BASE and MODEL and ROUTER):
    pytest.skip(
        "no vLLM vision server configured: set MICS_TEST_VLLM_VISION_BASE, MICS_TEST_VLLM_VISION_MODEL and "
        "MICS_TEST_VLLM_VISION_ROUTER, or run `bash tests/vllm/run_e2e.sh`, which serves a tiny vision model with "
        "`mics serve` and a media_dir and runs these",
        allow_module_level=True,
    )

import yaml  # noqa: E402  (the project's dependency; after the skip so that a bare collection needs nothing)

COMMAND_TIMEOUT = 900
INTERN_MAX_TOKENS = 16
MENTORS = ("stub-mentor-a", "stub-mentor-b")
JUDGE = "stub-judge"
_SHA_NAME = re.compile(r"([0-9a-f]{64})\.[a-z]+")


def report(key: str, value: Any) -> None:
    if not REPORT:
        return
    path = Path(REPORT)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2) + "\n")


def router_entries() -> list[dict[str, Any]]:
    return yaml.safe_load(Path(ROUTER).read_text())["model_list"]


def intern_name() -> str:
    return INTERN or next(entry["model_name"] for entry in router_entries() if ":" not in entry["model_name"])


def media_dir() -> Path:
    if MEDIA:
        return Path(MEDIA).resolve()
    declared = {(entry.get("model_info") or {}).get("media_dir") for entry in router_entries()
                if entry["model_name"] == intern_name()}
    assert len(declared) == 1 and None not in declared, f"{ROUTER} declares no one media_dir: {declared}"
    return Path(declared.pop())


def server_url(path: str) -> str:
    return BASE.removesuffix("/v1") + path


def finished_requests() -> float:
    with urllib.request.urlopen(server_url("/metrics"), timeout=30) as response:
        text = response.read().decode()
    return sum(float(match) for match in re.findall(r"^vllm:request_success_total(?:\{[^}]*\})? (\S+)$", text, re.M))


def post_chat(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST to the vision server's chat endpoint directly; (status, JSON reply or {'raw': text})."""
    request = urllib.request.Request(BASE + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, {"raw": raw.decode(errors="replace")}


def image_message(url: str, text: str = "Describe the image.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def example_images() -> list[Path]:
    return sorted((ROOT / "mics_agents" / "examples" / "images").glob("*.png"))


def put_in_media(source: Path) -> Path:
    """A copy of ``source`` in the media folder under its sha256 (as MediaFolder names files)."""
    data = source.read_bytes()
    target = media_dir() / f"{hashlib.sha256(data).hexdigest()}.png"
    if not target.exists():
        media_dir().mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


# --- a scripted stub (mentors, judge) and a recording proxy (interns -> vLLM), in this process --------------------

class _Quiet(ThreadingHTTPServer):
    daemon_threads = True


def _image_urls(body: dict[str, Any]) -> list[str]:
    return [part["image_url"]["url"] for message in body.get("messages", [])
            if isinstance(message.get("content"), list)
            for part in message["content"] if part.get("type") == "image_url"]


def _texts(body: dict[str, Any]) -> str:
    texts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return "\n".join(texts)


class Stub:
    """Mentors write two steps and the case's answer (found by its question in the prompt); the judge says No,
    so every item searches to MICS_MAX_DEPTH and the interns are called at every step. Records what it got."""

    def __init__(self, cases: list[dict[str, Any]]) -> None:
        self.cases = cases
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                reply = json.dumps(stub.answer(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        model, text = body.get("model", ""), _texts(body)
        with self.lock:
            self.requests.append({"model": model, "images": _image_urls(body)})
        if model == JUDGE:
            content = "No"
        else:
            case = next((case for case in self.cases if case["question"] in text), None)
            answer = case["answer"] if case else "unknown"
            content = (f"### Step 1: {model} reads the images of the case.\n\n"
                       f"### Step 2: {model} weighs the findings against the options.\n\n"
                       f"### The final answer is: {answer}")
        choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                   for i in range(int(body.get("n") or 1))]
        return {"id": "stub", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Proxy:
    """Forwards every request to the vLLM server unchanged and records its image URLs and vLLM's status."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.host, self.port = parsed.hostname, parsed.port
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=300)
                try:
                    connection.request("POST", self.path, raw, {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    status, reply = response.status, response.read()
                finally:
                    connection.close()
                try:
                    body = json.loads(raw)
                    urls, model = _image_urls(body), body.get("model")
                except (json.JSONDecodeError, AttributeError):
                    urls, model = [], None
                record = {"path": self.path, "model": model, "urls": urls, "status": status,
                          "error": None if status == 200 else reply.decode(errors="replace")[:500]}
                if status == 200:
                    try:
                        record["answers"] = [choice["message"]["content"] for choice in json.loads(reply)["choices"]]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        record["answers"] = None
                with proxy.lock:
                    proxy.records.append(record)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the two runs -----------------------------------------------------------------------------------------------

def load_cases(folder: Path) -> Path:
    """The image cases as a JSONL whose image paths resolve from ``folder``."""
    if CASES:
        return Path(CASES).resolve()
    examples = ROOT / "mics_agents" / "examples"
    shutil.copytree(examples / "images", folder / "images", dirs_exist_ok=True)
    lines = []
    for line in (examples / "cases.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        case["images"] = [f"images/{name}" for name in case["images"]]
        lines.append(json.dumps(case, ensure_ascii=False))
    (folder / "cases.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "cases.jsonl"


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def proxied_router(folder: Path, proxy: Proxy, *, by_reference: bool) -> Path:
    """`mics serve`'s Router config with the interns' api_base on the proxy; ``by_reference`` False: the
    deployment declares that it reads no folder (``model_info.media_dir: null``), so it gets data URLs."""
    config = yaml.safe_load(Path(ROUTER).read_text())
    for entry in config["model_list"]:
        if entry["model_name"] == intern_name():
            entry["litellm_params"]["api_base"] = proxy.base
            if not by_reference:
                entry.setdefault("model_info", {})["media_dir"] = None
    path = folder / ("router_file_urls.yaml" if by_reference else "router_data_urls.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_mics(folder: Path, *, by_reference: bool) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    data = load_cases(folder)
    cases = read_lines(data)
    stub, proxy = Stub(cases), Proxy(BASE)
    before_files = {path.name for path in media_dir().iterdir()} if media_dir().is_dir() else set()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MICS_")}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(ROOT),
        OPENAI_API_BASE=stub.base, OPENAI_API_KEY="EMPTY",
        MICS_MENTORS=",".join(f"openai/{name}" for name in MENTORS), MICS_JUDGE=f"openai/{JUDGE}",
        MICS_INTERNS=intern_name(), MICS_ROUTER_CONFIG=str(proxied_router(folder, proxy, by_reference=by_reference)),
        MICS_INTERN_TEMPERATURES="0", MICS_INTERN_MAX_TOKENS=str(INTERN_MAX_TOKENS), MICS_MAX_DEPTH="2",
        MICS_CACHE_PATH=str(folder / "cache.sqlite"), MICS_MAX_RETRIES="2", MICS_RETRY_MAX_WAIT="2",
        MICS_REQUEST_TIMEOUT="120",
    )
    served_before = finished_requests()
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mics_agents", "run", str(data), "--output", str(folder / "mics.jsonl"),
             "--concurrency", "3", "--json-summary", str(folder / "summary.json")],
            cwd=folder, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
        )
    finally:
        stub.close()
        proxy.close()
    seconds = time.monotonic() - started
    (folder / "mics.out").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    with sqlite3.connect(folder / "cache.sqlite") as db:
        calls = {key: (model, text) for key, model, text in db.execute("SELECT key, model, text FROM calls")}
    after_files = {path.name for path in media_dir().iterdir()} if media_dir().is_dir() else set()
    # Read before these tests read them: a new file's access time after its modification time says that someone
    # read it after mics wrote it (mics does not read a file it wrote; vLLM does). Reported, not asserted (a
    # noatime mount, or a read within the clock tick of the write, leaves the times equal).
    stats = {name: (media_dir() / name).stat() for name in after_files - before_files}
    return {
        "folder": folder, "result": result, "seconds": seconds, "cases": cases,
        "summary": json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {},
        "successes": read_lines(folder / "mics.jsonl"), "failures": read_lines(folder / "mics_failed.jsonl"),
        "stub": stub.requests, "proxy": proxy.records, "calls": calls, "new_files": after_files - before_files,
        "read_after_written": sum(stat.st_atime_ns > stat.st_mtime_ns for stat in stats.values()),
        "served": finished_requests() - served_before,
    }


@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> dict[str, Any]:
    return run_mics(tmp_path_factory.mktemp("file_urls"), by_reference=True)


@pytest.fixture(scope="module")
def data_run(tmp_path_factory, file_run) -> dict[str, Any]:
    return run_mics(tmp_path_factory.mktemp("data_urls"), by_reference=False)


def check_run(run: dict[str, Any]) -> None:
    """Every item ends with exactly one line, no model error, vLLM answered every intern request with 200."""
    result = run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ended = [record["rid"] for record in run["successes"] + run["failures"]]
    assert sorted(ended) == sorted(case["id"] for case in run["cases"]), "every item ends with exactly one line"
    errors = [failure["error"] for failure in run["failures"] if failure["error"]["kind"] == "model_error"]
    assert not errors, errors
    assert run["summary"]["model_error"] == 0, run["summary"]
    interns = [record for record in run["proxy"] if record["path"].endswith("/chat/completions")]
    assert interns, f"no intern request reached vLLM; stub saw {len(run['stub'])} requests"
    refused = [record for record in interns if record["status"] != 200]
    assert not refused, refused[:3]
    assert all(record["urls"] for record in interns), "every intern request of an image case carries its images"
    assert all(record["answers"] and all(answer.strip() for answer in record["answers"]) for record in interns)
    assert run["served"] >= len(interns), f"vLLM finished {run['served']} requests for {len(interns)} sent"
    # Mentors (API models) keep data URLs whatever the interns get.
    mentor_urls = [url for request in run["stub"] if request["model"] in MENTORS for url in request["images"]]
    assert mentor_urls and all(url.startswith("data:image/") for url in mentor_urls)


def run_report(run: dict[str, Any]) -> dict[str, Any]:
    interns = [record for record in run["proxy"] if record["path"].endswith("/chat/completions")]
    urls = [url for record in interns for url in record["urls"]]
    summary = run["summary"]
    return {"seconds": round(run["seconds"], 1), "items": len(run["cases"]), "success": summary.get("success"),
            "no_path": summary.get("no_path"), "calls": summary.get("calls"),
            "cached_calls": summary.get("cached_calls"),
            "intern_requests": len(interns), "image_parts": len(urls),
            "file_urls": sum(url.startswith("file://") for url in urls),
            "data_urls": sum(url.startswith("data:") for url in urls),
            "image_bytes_sent_inline": sum(len(url) for url in urls if url.startswith("data:")),
            "vllm_statuses": sorted({record["status"] for record in interns}), "server_requests": run["served"],
            "media_files_written": len(run["new_files"]), "media_files_read_after_written": run["read_after_written"]}


# --- the tests ----------------------------------------------------------------------------------------------------

def test_the_server_lists_the_model_and_the_router_declares_the_media_folder():
    with urllib.request.urlopen(server_url("/v1/models"), timeout=30) as response:
        served = {entry["id"] for entry in json.loads(response.read())["data"]}
    assert MODEL in served, served
    folder = media_dir()
    assert folder.is_dir() and folder.is_absolute()
    entries = [entry for entry in router_entries() if entry["model_name"] == intern_name()]
    assert entries and all(entry["model_info"]["media_dir"] == str(folder) for entry in entries)
    assert all(entry["litellm_params"]["model"] == f"hosted_vllm/{MODEL}" for entry in entries)


def test_the_server_reads_an_image_file_in_the_media_folder():
    """A file:// URL inside the folder is read, and the image is seen: two images give other logprobs."""
    first, second = (put_in_media(path) for path in example_images()[:2])
    logprobs = []
    for target in (first, second):
        status, reply = post_chat({"model": MODEL, "messages": image_message(target.as_uri()), "max_tokens": 1,
                                   "temperature": 0.0, "logprobs": True, "top_logprobs": 1})
        assert status == 200, reply
        logprobs.append(reply["choices"][0]["logprobs"]["content"][0]["logprob"])
    report("image_logprobs_of_two_media_files", logprobs)
    assert logprobs[0] != logprobs[1], "the model saw the same input for two different images"


def test_files_outside_the_media_folder_are_refused(tmp_path):
    """vLLM refuses any file:// path that, resolved, lies outside --allowed-local-media-path."""
    outside = tmp_path / "outside.png"
    shutil.copyfile(example_images()[0], outside)  # a readable, valid image: refused for where it is only
    link = media_dir() / "zz-link-to-outside.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    cases = {
        "etc_passwd": "file:///etc/passwd",
        "image_outside": outside.as_uri(),
        "dot_dot": f"file://{media_dir()}/../{'../' * len(media_dir().parts)}etc/passwd",
        "symlink_out": link.as_uri(),
    }
    answers = {}
    try:
        for name, url in cases.items():
            status, reply = post_chat({"model": MODEL, "messages": image_message(url), "max_tokens": 4})
            answers[name] = {"status": status, "error": json.dumps(reply)[:300]}
    finally:
        link.unlink(missing_ok=True)
    report("refused_outside_media_folder", answers)
    assert all(400 <= answer["status"] < 500 for answer in answers.values()), answers
    # The same image inside the folder is served (the refusals are about the place, not the file).
    status, reply = post_chat({"model": MODEL, "messages": image_message(put_in_media(outside).as_uri()),
                               "max_tokens": 4})
    assert status == 200, reply


def test_mics_run_sends_interns_their_images_as_file_urls_into_the_media_folder(file_run):
    check_run(file_run)
    report("mics_run_images_file_urls", run_report(file_run))
    folder = media_dir()
    interns = [record for record in file_run["proxy"] if record["path"].endswith("/chat/completions")]
    names = set()
    for record in interns:
        for url in record["urls"]:
            assert url.startswith("file://"), f"an intern image went as {url[:40]}..."
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
            assert path.parent == folder, f"{path} is not in the media folder {folder}"
            match = _SHA_NAME.fullmatch(path.name)
            assert match and hashlib.sha256(path.read_bytes()).hexdigest() == match.group(1), path
            names.add(path.name)
    # The prepared images were written there once each (content-addressed), and nothing else.
    assert file_run["new_files"] <= names, file_run["new_files"] - names
    assert not [path for path in folder.iterdir() if path.name.endswith(".part")], "a write left a part file"
    if LOG:
        report("vision_server_log", log_counts(Path(LOG)))


def test_the_same_run_by_data_url_sends_the_same_bytes_with_the_same_cache_keys_and_answers(file_run, data_run):
    check_run(data_run)
    report("mics_run_images_data_urls", run_report(data_run))

    def images_per_request(run: dict[str, Any], by_reference: bool) -> list[tuple[str, ...]]:
        requests = []
        for record in run["proxy"]:
            if not record["path"].endswith("/chat/completions"):
                continue
            digests = []
            for url in record["urls"]:
                if by_reference:
                    digests.append(_SHA_NAME.fullmatch(Path(urllib.parse.urlsplit(url).path).name).group(1))
                else:
                    assert url.startswith("data:image/"), url[:40]
                    digests.append(hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest())
            requests.append(tuple(digests))
        return sorted(requests)

    # The files hold exactly the bytes the data URLs carried, image for image and request for request.
    assert images_per_request(file_run, True) == images_per_request(data_run, False)
    # The cache keys hash the prepared image, never the URL: the same keys, and (greedy) the same answers.
    assert set(file_run["calls"]) == set(data_run["calls"])
    differing = [key for key in file_run["calls"] if file_run["calls"][key] != data_run["calls"][key]]
    report("file_vs_data_urls", {"calls": len(file_run["calls"]), "same_keys": True,
                                 "answers_differing": len(differing)})
    assert not differing, [(file_run["calls"][key], data_run["calls"][key]) for key in differing[:3]]


def log_counts(path: Path) -> dict[str, Any]:
    """What the vision server's log says: chat requests by status, and any local-media refusal."""
    text = path.read_text(errors="replace") if path.exists() else ""
    statuses: dict[str, int] = {}
    for status in re.findall(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})', text):
        statuses[status] = statuses.get(status, 0) + 1
    refusals = [line.strip()[:300] for line in text.splitlines()
                if "allowed-local-media-path" in line or "allowed_local_media_path" in line]
    return {"chat_statuses": statuses, "media_path_lines": refusals[:5]}
