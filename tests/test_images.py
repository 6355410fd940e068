"""Image loading: sources, hashing, downscaling, refusals with actionable messages."""

import hashlib
import io
import threading

import pytest
from PIL import Image

from mics_agents.errors import ImageError
from mics_agents.images import load_images


def png_bytes(size=(32, 24), colour=(200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_path_bytes_and_pil_give_hashed_images(tmp_path):
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    images = await load_images(
        [tmp_path / "a.png", data, Image.new("L", (8, 8))], max_side=1024, max_pixels=10**6
    )
    assert [image.mime for image in images] == ["image/png"] * 3
    assert images[0].sha256 == hashlib.sha256(data).hexdigest() == images[1].sha256
    assert images[0].label.endswith("a.png") and images[1].label == "<bytes>"
    assert images[0].data_url().startswith("data:image/png;base64,")


async def test_single_source_and_none():
    assert await load_images(None, max_side=64, max_pixels=10**6) == []
    assert len(await load_images(png_bytes(), max_side=64, max_pixels=10**6)) == 1


async def test_large_images_are_downscaled_and_odd_formats_reencoded():
    buffer = io.BytesIO()
    Image.new("RGB", (400, 100)).save(buffer, format="BMP")
    [image] = await load_images(buffer.getvalue(), max_side=200, max_pixels=10**6)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.size == (200, 50) and decoded.format == "PNG"


async def test_decoding_runs_off_the_event_loop(monkeypatch):
    import mics_agents.images as images_module

    threads = []
    original = images_module.load_image_sync

    def spy(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(images_module, "load_image_sync", spy)
    await load_images([png_bytes()], max_side=64, max_pixels=10**6)
    assert threads and threads[0] is not threading.main_thread()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: (d / "bad.png").write_bytes(b"not an image") and d / "bad.png", "not a supported image"),
        (lambda d: (d / "cut.png").write_bytes(png_bytes((300, 300))[:200]) and d / "cut.png", "corrupt"),
    ],
)
async def test_bad_images_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        await load_images(make(tmp_path), max_side=64, max_pixels=10**6)


async def test_too_many_pixels_is_refused_naming_the_setting():
    with pytest.raises(ImageError, match="MICS_IMAGE_MAX_PIXELS"):
        await load_images(png_bytes((100, 100)), max_side=64, max_pixels=5_000)


async def test_paths_may_not_escape_the_image_dir(tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    inside = tmp_path / "images"
    inside.mkdir()
    with pytest.raises(ImageError, match="outside the image folder"):
        await load_images("../secret.png", max_side=64, max_pixels=10**6, base_dir=inside)


def test_the_data_url_is_encoded_once_and_round_trips():
    import base64

    from mics_agents.models import ImagePart

    part = ImagePart(png_bytes(), "image/png", "h")
    first = part.data_url()
    assert part.data_url() is first
    assert base64.b64decode(first.split(",", 1)[1]) == part.data


async def test_the_cache_decodes_a_shared_file_once_and_notices_changes(tmp_path, monkeypatch):
    import os

    import mics_agents.images as images_module
    from mics_agents.images import ImageCache

    decoded = []
    original = images_module._decode

    def counting(source, **kwargs):
        decoded.append(source)
        return original(source, **kwargs)

    monkeypatch.setattr(images_module, "_decode", counting)
    (tmp_path / "sub").mkdir()
    (tmp_path / "scan.png").write_bytes(png_bytes())
    cache = ImageCache()
    first = await load_images(["scan.png"], max_side=64, max_pixels=10**6, base_dir=tmp_path, cache=cache)
    again = await load_images(["sub/../scan.png"], max_side=64, max_pixels=10**6, base_dir=tmp_path, cache=cache)
    assert len(decoded) == 1 and again[0].sha256 == first[0].sha256
    assert again[0].label == "sub/../scan.png", "each caller keeps the path it gave"
    (tmp_path / "scan.png").write_bytes(png_bytes((40, 30), (1, 2, 3)))
    os.utime(tmp_path / "scan.png", ns=(1, 10**18))
    changed = await load_images(["scan.png"], max_side=64, max_pixels=10**6, base_dir=tmp_path, cache=cache)
    assert len(decoded) == 2 and changed[0].sha256 != first[0].sha256


def test_the_cache_keeps_to_its_byte_budget():
    from mics_agents.images import ImageCache
    from mics_agents.models import ImagePart

    cache = ImageCache(max_bytes=250)
    for index in range(5):
        cache.put((index,), ImagePart(bytes(100), "image/png", str(index)))
    assert cache.get((0,)) is None and cache.get((2,)) is None
    assert cache.get((3,)) is not None and cache.get((4,)) is not None


# -- issue 15: paths the OS refuses, 16-bit scans, and memory bounded by design ----------------------------


@pytest.mark.parametrize(
    "name, fragment",
    [("a\x00b.png", "embedded null byte"), ("x" * 5000 + ".png", "cannot be used"), ("loop-a.png", "ymlink loop")],
)
async def test_paths_the_os_refuses_are_image_errors(tmp_path, name, fragment):
    (tmp_path / "loop-a.png").symlink_to("loop-b.png")
    (tmp_path / "loop-b.png").symlink_to("loop-a.png")
    with pytest.raises(ImageError, match=fragment) as caught:
        await load_images([name], max_side=64, max_pixels=10**6, base_dir=tmp_path)
    assert len(str(caught.value)) < 400, "a long path is shown cut"


async def test_a_16_bit_scan_is_downscaled_to_8_bit_grey():
    image = Image.new("I;16", (300, 200))
    image.putpixel((10, 10), 4000)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    [part] = await load_images(buffer.getvalue(), max_side=100, max_pixels=10**6)
    decoded = Image.open(io.BytesIO(part.data))
    assert decoded.size == (100, 67) and decoded.mode == "L"


async def test_a_file_above_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import mics_agents.images as images_module

    monkeypatch.setattr(images_module, "MAX_IMAGE_FILE_BYTES", 100)
    (tmp_path / "a.png").write_bytes(png_bytes((64, 64)) + bytes(200))
    with pytest.raises(ImageError, match="MiB file, above the 0 MiB"):
        await load_images(["a.png"], max_side=64, max_pixels=10**6, base_dir=tmp_path)


async def test_decodes_across_the_process_share_one_memory_budget(monkeypatch, tmp_path):
    """Eight loads at once, a budget that fits two decodes: never more than two decode together."""
    import time

    import mics_agents.images as images_module

    one = images_module.decode_cost(400, 400, "RGB", len(png_bytes((400, 400))))
    monkeypatch.setattr(images_module, "decode_budget", images_module._DecodeBudget(2 * one + 10))
    running, peak = [0], [0]
    lock = threading.Lock()
    original = images_module._finish

    def watched(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(images_module, "_finish", watched)
    sources = [png_bytes((400, 400), (index, 0, 0)) for index in range(8)]
    parts = await load_images(sources, max_side=64, max_pixels=10**6)
    assert len(parts) == 8 and peak[0] == 2


def test_an_image_larger_than_the_whole_budget_still_decodes_alone():
    from mics_agents.images import _DecodeBudget

    budget = _DecodeBudget(100)
    with budget.hold(10**9):
        assert budget.free == 0
    assert budget.free == 100


def test_the_report_refuses_thumbnails_above_the_cap(tmp_path, monkeypatch):
    import mics_agents.report.data as report_data

    (tmp_path / "big.png").write_bytes(png_bytes((120, 100)))
    (tmp_path / "small.png").write_bytes(png_bytes((20, 10)))
    monkeypatch.setattr(report_data, "DEFAULT_MAX_PIXELS", 5_000)
    warnings: list[str] = []
    urls = dict(report_data._thumbnails(["big.png", "small.png"], tmp_path, 32, warnings))  # made as the page is written
    assert urls["big.png"] is None and urls["small.png"].startswith("data:image/jpeg;base64,")
    assert any("above 5,000 pixels" in warning for warning in warnings)


def test_a_smaller_copy_comes_from_the_loaded_image_with_a_stable_key_of_its_own():
    """Mentors' 512 px images are made from the already loaded image (no second read, decode or hash of
    the original); an image already small enough is the same part."""
    import io

    from PIL import Image

    from mics_agents.images import load_image_sync, smaller_copy

    buffer = io.BytesIO()
    Image.new("RGB", (1200, 800), (90, 30, 200)).save(buffer, format="PNG")
    loaded = load_image_sync(buffer.getvalue(), max_side=1536, max_pixels=10_000_000)
    small = smaller_copy(loaded, 512)
    assert Image.open(io.BytesIO(small.data)).size == (512, 341) and small.mime == "image/png"
    assert small.cache_id != loaded.cache_id and smaller_copy(loaded, 512).cache_id == small.cache_id
    assert smaller_copy(loaded, 2048) is loaded


# -- the intern image budget (published Qwen processor: 256*28*28 to 1280*28*28 pixels) --------------------


async def _part(size, mode="RGB", fmt="PNG"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    [part] = await load_images(buffer.getvalue(), max_side=4096, max_pixels=10**8)
    return part


@pytest.mark.parametrize(
    "size, expected_pixels",
    [((1536, 1152), (800_000, 1_003_520)),   # above the budget: down to at most 1280*28*28
     ((100, 80), (200_704, 215_000)),        # below it: up to at least 256*28*28
     ((3000, 20), (200_704, 215_000))],      # a sliver: enlarged by pixel count, its shape kept
)
async def test_an_image_outside_the_intern_budget_is_scaled_into_it_keeping_its_shape(size, expected_pixels):
    from mics_agents.images import within_pixels

    part = await _part(size)
    scaled = within_pixels(part, 256 * 28 * 28, 1280 * 28 * 28)
    width, height = Image.open(io.BytesIO(scaled.data)).size
    assert expected_pixels[0] <= width * height <= expected_pixels[1]
    assert abs(width / height - size[0] / size[1]) / (size[0] / size[1]) < 0.1
    assert scaled.cache_id != part.cache_id and scaled.label == part.label


async def test_an_image_within_the_intern_budget_or_with_no_budget_is_sent_as_it_is():
    from mics_agents.images import within_pixels

    part = await _part((1024, 768), fmt="JPEG")
    assert within_pixels(part, 256 * 28 * 28, 1280 * 28 * 28) is part
    assert within_pixels(await _part((4000, 3000)), 0, 0).data == (await _part((4000, 3000))).data
    # A budget whose bounds nearly meet never pushes a small image above its maximum.
    tiny = await _part((7, 5))
    out = within_pixels(tiny, 1000, 1001)
    assert Image.open(io.BytesIO(out.data)).size[0] * Image.open(io.BytesIO(out.data)).size[1] <= 1001


async def test_a_16_bit_scan_is_scaled_to_8_bit_grey():
    from mics_agents.images import within_pixels

    part = await _part((2000, 1000), mode="I;16")
    scaled = within_pixels(part, 0, 500_000)
    with Image.open(io.BytesIO(scaled.data)) as image:
        assert image.mode == "L" and image.size[0] * image.size[1] <= 500_000
