"""Images by reference (issue 30): for a server that reads a media folder, each prepared image is written once
into it, content-addressed, and requests carry its ``file://`` URL; the server reads exactly the bytes a data
URL would have carried, the answers and cache keys are those of data URLs, and nothing outside the folder can
be named. Mentors and API models keep data URLs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import yaml
from PIL import Image

from mics_agents.errors import ConfigError, ModelCallError
from mics_agents.images import load_images
from mics_agents.media import MediaFolder, media_file_name
from mics_agents.models.base import ChatMessage, ImagePart, ModelRequest, TextPart
from mics_agents.models.direct import DirectEndpoint, DirectTransport, _needs_a_thread, direct_replicas, request_body

from .openai_server import OpenAIServer
from .test_litellm_http import CASE_INFO, IMAGE, QUESTION, ANSWER, comparable, png  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:Items .* using the `ReadOnly` qualifier:UserWarning")


# -- images as the search prepares them ------------------------------------------------------------------------


def noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    import random

    rng = random.Random(seed)
    if mode == "I;16":
        image = Image.new("I;16", size)
        image.putdata([rng.randrange(300, 4000) for _ in range(size[0] * size[1])])
        return image
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture
def prepared(tmp_path) -> dict[str, ImagePart]:
    """One image of each kind, loaded as an intern's are: a resized file, a 16-bit scan (stretched to 8 bits),
    bytes (a JPEG, resized), a PIL image, and a small PNG file sent as it is read."""
    (tmp_path / "big.png").write_bytes(encoded(noise("RGB", (300, 200), 1), "PNG"))
    (tmp_path / "scan16.png").write_bytes(encoded(noise("I;16", (160, 120), 2), "PNG"))
    (tmp_path / "small.png").write_bytes(encoded(noise("RGB", (40, 30), 3), "PNG"))
    sources = {
        "resized": "big.png",
        "16-bit": "scan16.png",
        "bytes": encoded(noise("RGB", (256, 256), 4), "JPEG"),
        "PIL": noise("RGBA", (64, 48), 5),
        "as read": "small.png",
    }
    parts = asyncio.run(load_images(list(sources.values()), max_side=96, max_pixels=10**7, base_dir=tmp_path))
    loaded = dict(zip(sources, parts))
    assert loaded["resized"].cache_id != loaded["resized"].sha256  # it was resized and re-encoded
    with Image.open(io.BytesIO(loaded["16-bit"].data)) as image:
        assert image.mode == "L" and max(image.size) == 96  # stretched to 8 bits
    assert loaded["bytes"].mime == "image/jpeg" and loaded["PIL"].mime == "image/png"
    assert loaded["as read"].data == (tmp_path / "small.png").read_bytes()
    return loaded


def a_request(*images: ImagePart, text: str = "## Question\nWhich finding?") -> ModelRequest:
    return ModelRequest(
        messages=(ChatMessage.text("system", "You are an intern."), ChatMessage("user", (*images, TextPart(text)))),
        temperature=0.7, max_tokens=64,
    )


def vllm_endpoint(server: OpenAIServer, model: str = "intern-1") -> DirectEndpoint:
    return DirectEndpoint(server.base_url + "/chat/completions", None, model, provider="hosted_vllm")


async def ask(transport: DirectTransport, *requests: ModelRequest) -> list[str]:
    try:
        return [(await transport.request(request)).text for request in requests]
    finally:
        await transport.aclose()


def file_of(url: str) -> Path:
    return Path(url2pathname(urlparse(url).path))


# -- what the server reads ---------------------------------------------------------------------------------------


def test_the_server_reads_exactly_the_bytes_a_data_url_carries_for_every_kind_of_image(prepared, tmp_path):
    media = tmp_path / "media"
    kinds = list(prepared)
    with OpenAIServer(media_dir=media) as server:
        by_data = asyncio.run(ask(DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10),
                                  *(a_request(prepared[kind]) for kind in kinds)))
        by_file = asyncio.run(ask(DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10,
                                                  media_dir=media), *(a_request(prepared[kind]) for kind in kinds)))
        records = server.recorded()
        assert server.errors == []
    assert by_file == by_data
    data_records, file_records = records[: len(kinds)], records[len(kinds):]
    for kind, data_record, file_record in zip(kinds, data_records, file_records):
        part = prepared[kind]
        assert data_record.image_urls[0].startswith(f"data:{part.mime};base64,")
        (url,) = file_record.image_urls
        assert url.startswith("file:///"), kind
        assert file_record.images == data_record.images == [part.data], kind  # the same bytes, byte for byte
        path = file_of(url)
        assert path.parent == media.resolve() and path.name == media_file_name(part.data, part.mime)
        assert path.name.startswith(hashlib.sha256(part.data).hexdigest())
        assert "base64" not in json.dumps(file_record.body), "no image bytes travel with a file:// request"
    # Never the original file, even for an image sent as it was read.
    assert file_of(file_records[kinds.index("as read")].image_urls[0]) != (tmp_path / "small.png").resolve()
    assert sorted(path.name for path in media.iterdir()) == sorted(
        media_file_name(prepared[kind].data, prepared[kind].mime) for kind in kinds
    ), "one file per image, and no file left half-written"


def test_the_file_url_is_percent_encoded_and_the_server_finds_it(tmp_path):
    media = tmp_path / 'odd "folder" #1 %20 ü'
    part = ImagePart(b"\x89PNG fake", "image/png", hashlib.sha256(b"\x89PNG fake").hexdigest())
    body = json.loads(request_body(a_request(part), "m", {}, MediaFolder(media)))
    url = body["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("file:///") and " " not in url and '"' not in url and "#" not in url
    assert file_of(url).read_bytes() == part.data and file_of(url).parent == media.resolve()


def test_an_image_is_written_once_off_the_event_loop_however_many_calls_send_it(tmp_path, monkeypatch):
    media = MediaFolder(tmp_path / "media")
    part = ImagePart(b"image bytes" * 1000, "image/png", hashlib.sha256(b"image bytes" * 1000).hexdigest())
    writes: list[str] = []
    store = MediaFolder.store

    def counted(self, image):
        writes.append(threading.current_thread().name)
        return store(self, image)

    monkeypatch.setattr(MediaFolder, "store", counted)
    loop_threads: list[str] = []
    with OpenAIServer(media_dir=media.path) as server:
        async def many() -> list[str]:
            loop_threads.append(threading.current_thread().name)
            transport = DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10, media_dir=media.path)
            try:
                first = await transport.request(a_request(part, text="call 0"))
                rest = await asyncio.gather(*(transport.request(a_request(part, text=f"call {n}")) for n in range(1, 8)))
                return [first.text, *(reply.text for reply in rest)]
            finally:
                await transport.aclose()

        replies = asyncio.run(many())
        assert server.count() == 8 and all(record.images == [part.data] for record in server.recorded())
    assert len(replies) == 8
    assert len(writes) == 1, "written once per image, not per call"
    assert writes[0] != loop_threads[0], "written in a worker thread, not on the event loop"
    assert media.ready(part) and not _needs_a_thread(a_request(part), media)  # later bodies are built at once


def test_calls_sent_at_once_with_new_images_wait_for_one_write_of_each(tmp_path, monkeypatch, caplog):
    """A case's calls go out together: each image is written once (not once per call, nor read back by each),
    a call cancelled meanwhile leaves the write to the others, and a folder that cannot be written sends every
    one of them data URLs with one warning."""
    media = MediaFolder(tmp_path / "media")
    parts = [ImagePart(bytes([n]) * 5000, "image/png", hashlib.sha256(bytes([n]) * 5000).hexdigest()) for n in range(3)]
    writes: list[str] = []
    store = MediaFolder.store
    started = threading.Event()

    def slow_counted(self, image):
        writes.append(image.sha256)
        started.set()
        threading.Event().wait(0.2)  # long enough for every call to arrive while it writes
        return store(self, image)

    monkeypatch.setattr(MediaFolder, "store", slow_counted)
    with OpenAIServer(media_dir=media.path) as server:
        async def at_once() -> list[str]:
            transport = DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10, media_dir=media.path)
            try:
                cancelled = asyncio.ensure_future(transport.request(a_request(*parts, text="cancelled")))
                calls = [asyncio.ensure_future(transport.request(a_request(*parts, text=f"call {n}"))) for n in range(8)]
                await asyncio.sleep(0.05)
                cancelled.cancel()
                return [reply.text for reply in await asyncio.gather(*calls)]
            finally:
                await transport.aclose()

        assert len(asyncio.run(at_once())) == 8
        assert sorted(writes) == sorted(part.sha256 for part in parts), "each image written once"
        assert all(record.images == [part.data for part in parts] for record in server.recorded())
        assert all(record.image_urls and all(url.startswith("file://") for url in record.image_urls)
                   for record in server.recorded())

    unwritable = tmp_path / "not-a-folder"
    unwritable.write_text("a file where the folder should be")
    fresh = [ImagePart(b"x" * 3000, "image/png", hashlib.sha256(b"x" * 3000).hexdigest())]
    with OpenAIServer(media_dir=unwritable) as server:
        async def refused() -> None:
            transport = DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10, media_dir=unwritable)
            try:
                await asyncio.gather(*(transport.request(a_request(*fresh, text=f"call {n}")) for n in range(4)))
            finally:
                await transport.aclose()

        with caplog.at_level(logging.WARNING, logger="mics_agents"):
            asyncio.run(refused())
        assert server.count() == 4
        assert all(url.startswith("data:") for record in server.recorded() for url in record.image_urls)
    assert caplog.text.count("cannot write images into the media folder") == 1


def test_a_file_already_there_is_kept_and_a_wrong_one_is_replaced(tmp_path):
    folder = MediaFolder(tmp_path / "media")
    part = ImagePart(b"the prepared bytes", "image/jpeg", hashlib.sha256(b"the prepared bytes").hexdigest())
    path = folder.store(part)
    inode = path.stat().st_ino
    assert MediaFolder(folder.path).store(part) == path and path.stat().st_ino == inode  # another process: kept
    for wrong in (b"the prepared byteX", b"the prep"):  # changed by hand; cut short
        path.write_bytes(wrong)
        assert MediaFolder(folder.path).store(part) == path and path.read_bytes() == part.data
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(part.data)
    path.unlink()
    path.symlink_to(outside)  # a link at the image's name is not trusted, and not written through
    MediaFolder(folder.path).store(part)
    assert not path.is_symlink() and path.read_bytes() == part.data and outside.read_bytes() == part.data


@pytest.mark.parametrize("claimed", ["../../outside", "/tmp/x", "A" * 64, "", "0" * 63 + "/"])
def test_a_file_name_is_always_a_sha256_in_the_folder_whatever_the_image_claims(tmp_path, claimed):
    folder = MediaFolder(tmp_path / "media")
    data = b"bytes of an image"
    path = folder.store(ImagePart(data, "image/png", claimed))
    assert path.parent == folder.path and path.name == hashlib.sha256(data).hexdigest() + ".png"
    assert [entry.name for entry in tmp_path.iterdir()] == ["media"]


WRITER = """
import sys
from mics_agents import media
from mics_agents.media import MediaFolder
from mics_agents.models.base import ImagePart
media._holds = lambda path, data: False  # write every time: the race is the point
data = bytes(range(256)) * 4096
part = ImagePart(data, "image/png", "x")
folder = MediaFolder(sys.argv[1])
for _ in range(int(sys.argv[2])):
    folder.store(part)
"""


def test_two_processes_writing_one_image_leave_one_whole_file_and_a_reader_never_sees_part_of_it(tmp_path):
    folder = tmp_path / "media"
    data = bytes(range(256)) * 4096
    target = folder / media_file_name(data, "image/png")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), "150"]) for _ in range(2)]
    seen: set[int] = set()
    while any(writer.poll() is None for writer in writers):
        try:
            seen.add(len(target.read_bytes()))
        except FileNotFoundError:
            pass
    assert [writer.returncode for writer in writers] == [0, 0]
    assert seen <= {len(data)}, "a reader saw a file being written"
    assert target.read_bytes() == data and [path.name for path in folder.iterdir()] == [target.name]


def test_a_folder_that_cannot_be_written_costs_the_files_not_the_answers(tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")
    part = ImagePart(b"img", "image/png", hashlib.sha256(b"img").hexdigest())
    with OpenAIServer() as server:  # reads no folder: a file:// URL would be refused
        with caplog.at_level(logging.WARNING, logger="mics_agents"):
            replies = asyncio.run(ask(DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10,
                                                      media_dir=blocked), a_request(part), a_request(part, text="2")))
        assert [record.image_urls[0][:5] for record in server.recorded()] == ["data:", "data:"]
        assert all(record.images == [part.data] for record in server.recorded())
    assert len(replies) == 2
    warnings = [record for record in caplog.records if "media folder" in record.getMessage()]
    assert len(warnings) == 1, "one warning, not one per call"


# -- the fake server refuses what vLLM refuses --------------------------------------------------------------------


def post(server: OpenAIServer, url: str) -> tuple[int, str]:
    body = {"model": "intern-1", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "## Question\nWhich?"}]}]}
    request = urllib.request.Request(server.base_url + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_server_refuses_any_file_outside_its_folder(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    (media / "inside.png").write_bytes(b"yours")
    (media / "link.png").symlink_to(secret)
    (media / "sub").mkdir()
    with OpenAIServer(media_dir=media) as server:
        assert post(server, (media / "inside.png").as_uri())[0] == 200
        assert server.recorded()[-1].images == [b"yours"]
        for url in [
            secret.as_uri(),                                      # outside
            (media / "..").as_uri() + "/secret.png",              # escaping with ..
            "file://" + str(media) + "/sub/../../secret.png",
            "file://" + str(media).replace("/", "%2F") + "%2F..%2Fsecret.png",
            (media / "link.png").as_uri(),                        # a symlink out of it
            "file://otherhost" + str(media / "inside.png"),       # another machine's file
            media.as_uri(),                                       # the folder itself
            (media / "missing.png").as_uri(),
        ]:
            status, text = post(server, url)
            assert status == 400, (url, text)
            assert "not yours" not in text
        assert all(record.images != [b"not yours"] for record in server.recorded())
    with OpenAIServer() as plain:  # no folder at all: vLLM without --allowed-local-media-path
        assert post(plain, (media / "inside.png").as_uri())[0] == 400


def test_a_file_url_the_server_refuses_fails_the_call_and_is_not_retried(tmp_path):
    part = ImagePart(b"img", "image/png", hashlib.sha256(b"img").hexdigest())
    with OpenAIServer(media_dir=tmp_path / "served") as server:  # reads another folder than the one written
        (tmp_path / "served").mkdir()
        with pytest.raises(ModelCallError, match="HTTP 400"):
            asyncio.run(ask(DirectTransport("hosted_vllm/intern-1", vllm_endpoint(server), timeout=10,
                                            media_dir=tmp_path / "written"), a_request(part)))
        assert server.count() == 1


# -- who gets file:// URLs --------------------------------------------------------------------------------------


def router(tmp_path: Path, deployments: list[dict]) -> object:
    from mics_agents.models.providers import load_router

    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model_list": deployments}))
    return load_router(path)


def deployment(name: str, model: str, base: str, **info) -> dict:
    entry = {"model_name": name, "litellm_params": {"model": model, "api_base": base}}
    if info:
        entry["model_info"] = info
    return entry


def test_the_setting_reaches_hosted_vllm_only_and_a_deployment_says_for_itself(tmp_path):
    setting, declared = tmp_path / "setting", tmp_path / "declared"
    base = "http://127.0.0.1:9/v1"
    assert DirectTransport("hosted_vllm/m", DirectEndpoint(base, None, "m", provider="hosted_vllm"), timeout=1,
                           media_dir=setting).media[0].path == setting.resolve()
    # An openai/ model on a base URL of one's own may be any server (or a gateway to an API): data URLs.
    assert DirectTransport("openai/m", DirectEndpoint(base, None, "m", provider="openai"), timeout=1,
                           media_dir=setting).media == [None]
    assert DirectTransport("hosted_vllm/m", DirectEndpoint(base, None, "m", provider="hosted_vllm"), timeout=1).media == [None]
    replicas = direct_replicas(router(tmp_path, [
        deployment("pool", "hosted_vllm/m", base, media_dir=str(declared)),
        deployment("pool", "hosted_vllm/m", base.replace("9", "10"), media_dir=None),  # declared: none
        deployment("pool", "hosted_vllm/m", base.replace("9", "11")),  # says nothing: the setting
        deployment("pool", "openai/m", base.replace("9", "12"), media_dir=str(declared)),  # declared
    ]), "pool")
    media = DirectTransport("pool", replicas, timeout=1, media_dir=setting).media
    assert [folder.path if folder else None for folder in media] == [
        declared.resolve(), None, setting.resolve(), declared.resolve()]


@pytest.mark.parametrize("value", ["relative/media", 7, ["a"]])
def test_a_declared_media_dir_must_be_an_absolute_folder(tmp_path, value):
    config = router(tmp_path, [deployment("pool", "hosted_vllm/m", "http://127.0.0.1:9/v1", media_dir=value)])
    with pytest.raises(ConfigError, match="media_dir"):
        direct_replicas(config, "pool")


def cache_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {key for (key,) in db.execute("SELECT key FROM calls")}


async def search(settings):
    from mics_agents.search import Searcher

    async with await Searcher.open(settings) as searcher:
        return await searcher.search(QUESTION, IMAGE, answer=ANSWER, case_info=CASE_INFO, rid="case-5")


def test_a_search_gives_the_same_answers_and_cache_keys_with_images_by_reference(png, tmp_path, monkeypatch):
    from .test_litellm_http import make_settings

    media = tmp_path / "media"
    with OpenAIServer(media_dir=media) as server:
        monkeypatch.setenv("OPENAI_API_BASE", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

        def run(label: str, **info):
            config = tmp_path / f"router-{label}.yaml"
            config.write_text(yaml.safe_dump({"model_list": [
                deployment(f"intern-{n}", f"hosted_vllm/intern-{n}", server.base_url, supports_n=True, **info)
                for n in (1, 2)
            ]}))
            first = server.count()
            settings = make_settings(tmp_path / f"{label}.sqlite", interns=["intern-1", "intern-2"], router_config=config)
            result = asyncio.run(search(settings))
            return result, server.recorded()[first:]

        by_data, data_records = run("data")
        by_file, file_records = run("file", media_dir=str(media))
        assert server.errors == []
    assert by_file.status == "success"
    assert comparable(by_file) == comparable(by_data)
    assert cache_keys(tmp_path / "file.sqlite") == cache_keys(tmp_path / "data.sqlite")
    assert [record.images for record in file_records] == [record.images for record in data_records]
    interns = [record for record in file_records if record.model.startswith("intern")]
    others = [record for record in file_records if not record.model.startswith("intern")]
    assert interns and all(record.image_urls for record in interns)
    assert all(url.startswith("file://") for record in interns for url in record.image_urls)
    assert any(record.image_urls for record in others)
    assert all(url.startswith("data:") for record in others for url in record.image_urls), "mentors keep data URLs"
    assert all(url.startswith("data:") for record in data_records for url in record.image_urls)


# -- mics serve ---------------------------------------------------------------------------------------------------


def serve_config(tmp_path: Path, **extra) -> dict:
    return {
        "router_config": str(tmp_path / "router.yaml"),
        "launcher": ["vllm-serve"],
        "models": [{"name": "qwen-intern", "model": "Qwen/Qwen2.5-VL-7B-Instruct", "lora_modules": {"chiron": "a"},
                    "replicas": [{"port": 8001}, {"host": "gpu2.internal", "port": 8001, "launch": False}]}],
        **extra,
    }


def test_mics_serve_lets_vllm_read_the_media_folder_and_nothing_wider(tmp_path, monkeypatch):
    from mics_agents.serve import ServeConfig, dry_run_commands, launch_command, router_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = ServeConfig.model_validate(serve_config(tmp_path, media_dir="link/media"))
    folder = (tmp_path / "real" / "media").resolve()
    spec = config.models[0]
    command = launch_command(config, spec, spec.replicas[0])
    flags = [index for index, arg in enumerate(command) if "allowed-local-media" in arg]
    assert flags == [command.index("--allowed-local-media-path")] and command[flags[0] + 1] == str(folder)
    routes = router_config(config)["model_list"]
    here = [route for route in routes if route["litellm_params"]["api_base"] == "http://127.0.0.1:8001/v1"]
    there = [route for route in routes if route not in here]
    assert len(here) == 2 and all(route["model_info"]["media_dir"] == str(folder) for route in here)  # adapters too
    assert len(there) == 2 and all(route["model_info"]["media_dir"] is None for route in there)
    # The Router config mics run reads sends the local replica file:// URLs into that folder, the remote data URLs.
    replicas = direct_replicas(router(tmp_path, routes), "qwen-intern")
    assert [folder_.path if folder_ else None for folder_ in DirectTransport("qwen-intern", replicas, timeout=1).media] == [folder, None]
    # The dry run makes the folder (vLLM refuses one that is not there) before any server starts.
    commands = dry_run_commands(config)
    assert commands[0] == f"mkdir -p -- {folder}"
    subprocess.run(["bash", "-c", commands[0]], check=True)
    assert folder.is_dir()


def test_without_a_media_folder_mics_serve_is_as_before(tmp_path):
    from mics_agents.serve import ServeConfig, dry_run_commands, launch_command, router_config

    config = ServeConfig.model_validate(serve_config(tmp_path))
    assert "--allowed-local-media-path" not in launch_command(config, config.models[0], config.models[0].replicas[0])
    assert all("media_dir" not in route["model_info"] for route in router_config(config)["model_list"])
    assert not dry_run_commands(config)[0].startswith("mkdir")


@pytest.mark.parametrize("extra, problem", [
    ({"media_dir": "/"}, "every file"),
    ({"media_dir": "~"}, "every file"),
    ({"media_dir": "afile"}, "is a file"),
])
def test_a_media_folder_that_is_too_wide_or_not_a_folder_is_refused(tmp_path, monkeypatch, extra, problem):
    from pydantic import ValidationError

    from mics_agents.serve import ServeConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValidationError, match=problem):
        ServeConfig.model_validate(serve_config(tmp_path, **extra))


@pytest.mark.parametrize("args", [["--allowed-local-media-path", "/"], ["--allowed-local-media-path=/data"]])
def test_the_vllm_flag_in_extra_args_is_refused_for_media_dir(tmp_path, args):
    from pydantic import ValidationError

    from mics_agents.serve import ServeConfig

    data = serve_config(tmp_path)
    data["models"][0]["extra_args"] = args
    with pytest.raises(ValidationError, match="media_dir"):
        ServeConfig.model_validate(data)


def test_the_setting_is_a_folder(tmp_path):
    from mics_agents.config import load_settings

    assert load_settings().media_dir is None and load_settings(media_dir="").media_dir is None
    assert load_settings(media_dir=str(tmp_path / "m")).media_dir == tmp_path / "m"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="MICS_MEDIA_DIR"):
        load_settings(media_dir=str(tmp_path / "f"))


def test_mics_media_dir_reaches_the_transport_the_factory_builds(tmp_path, monkeypatch):
    from mics_agents.config import load_settings
    from mics_agents.models.factory import _transport

    monkeypatch.setenv("HOSTED_VLLM_API_BASE", "http://127.0.0.1:9/v1")
    settings = load_settings(media_dir=tmp_path / "media")
    transport = _transport("hosted_vllm/m", settings, None)
    assert [folder.path for folder in transport.media] == [(tmp_path / "media").resolve()]
    assert _transport("hosted_vllm/m", load_settings(), None).media == [None]
