"""Loading case images: from a path, bytes or a PIL image to an encoded, hashed :class:`ImagePart`.

Decoding, resizing and hashing are CPU and disk work, so they run in a worker thread, never on the
event loop. Each image is hashed once, here; the cache key uses that hash.

Memory is bounded by design, not by luck. A PNG of a few MB can hold 80 M pixels, and a decode and
downscale peaks, measured, at ~1.3 bytes per pixel for grey, ~5 for RGB, ~7 for 16-bit grey and ~9 for
RGBA (Pillow keeps RGB in 4 bytes, and premultiplies RGBA in a second full-size buffer), so:

- an image with more pixels than ``max_pixels`` (``MICS_IMAGE_MAX_PIXELS``, default
  :data:`DEFAULT_MAX_PIXELS` = 40 M) is refused from its header, before it is decoded. The largest images
  medicine makes are full-field mammograms: 24 x 30 cm at 50 um is 4,800 x 6,000 = 28.8 M pixels (most are
  13-20 M); chest radiographs are 9-18 M, CT and MR slices 0.25 M. 40 M takes all of them with 40% to spare
  and still refuses decompression bombs; one such decode peaks near 200 MB (RGB);
- a file larger than :data:`MAX_IMAGE_FILE_BYTES` is refused before it is read;
- decodes across the whole process share one budget, :data:`DECODE_BUDGET_BYTES` (400 MB) of estimated
  peak memory: a decode waits (first come, first served) until its estimate fits, so however many items,
  searchers or report threads decode at once, their buffers stay under it. One image estimated above the
  whole budget (a raised cap) decodes alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import ImageError
from .models.base import ImagePart

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageSource", "ImageCache", "load_images", "load_image_sync", "smaller_copy", "within_pixels", "decode_budget",
    "to_8bit",
    "DEFAULT_MAX_PIXELS", "DECODE_BUDGET_BYTES", "MAX_IMAGE_FILE_BYTES", "decode_cost",
    "return_freed_buffers_to_the_os",
]

DEFAULT_MAX_PIXELS = 40_000_000
DECODE_BUDGET_BYTES = 400_000_000
# Peak bytes per pixel of a decode and downscale, by Pillow mode (measured on 36 M pixel PNGs).
_PEAK_BYTES_PER_PIXEL = {"1": 1.5, "L": 1.5, "P": 1.5, "LA": 7.0, "La": 7.0, "I;16": 7.0, "I;16B": 7.0,
                         "I;16L": 7.0, "I;16N": 7.0, "RGBA": 9.0, "RGBa": 9.0, "PA": 9.0}
MAX_IMAGE_FILE_BYTES = 256 * 1024 * 1024
_LABEL_CHARS = 200

ImageSource = Union[str, os.PathLike, bytes, "PILImage"]

# Formats every vision API accepts as they are; anything else is re-encoded as PNG.
_PASS_THROUGH = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def decode_cost(width: int, height: int, mode: str, file_bytes: int = 0) -> int:
    """Estimated peak bytes of decoding and downscaling an image: what it takes of the decode budget."""
    return int(width * height * _PEAK_BYTES_PER_PIXEL.get(mode, 5.5)) + file_bytes


def return_freed_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (Linux; the CLI calls this at start-up).

    glibc raises the threshold to the size of the last large block freed (up to 32 MiB), so after the first
    decode every image buffer comes from the heap and stays in the process once freed: measured, four large
    decodes left ~250 MB more resident than the decode budget allows. With the threshold fixed, every
    buffer above 128 KiB is its own mapping, returned when freed. Returns whether it was applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl): nothing to fix
        return False


class _DecodeBudget:
    """Estimated bytes in decode across the process, first come first served (see the module's notes)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._condition = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, cost: int) -> Iterator[None]:
        units = max(1, min(int(cost), self.total))
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self.free < units:
                self._condition.wait()
            self._queue.popleft()
            self.free -= units
            self._condition.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._condition:
                self.free += units
                self._condition.notify_all()


decode_budget = _DecodeBudget(DECODE_BUDGET_BYTES)


def _label(source: Any) -> str:
    text = str(source)
    return text if len(text) <= _LABEL_CHARS else f"{text[:_LABEL_CHARS]}... ({len(text):,} characters)"


def _resolve(source: str | os.PathLike, base_dir: Path | None) -> tuple[Path, str]:
    """The file an image path names (refusing one that leaves ``base_dir``), and its label. A path the OS
    cannot take (a NUL, too long, a symlink loop) is an :class:`ImageError` like a missing file."""
    label = _label(source)
    try:
        path = Path(source)
        if base_dir is not None:
            root = Path(base_dir).resolve()
            path = (root / path).resolve()
            if not path.is_relative_to(root):
                raise ImageError(f"image {label!r} points outside the image folder {str(base_dir)!r}; refused")
        found = path.is_file()
    except ImageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: Path.resolve() meeting a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ImageError(f"image path {label!r} cannot be used: {reason}") from None
    if not found:
        raise ImageError(f"image {label!r} not found (looked at {_label(path)!r})")
    return path, label


class ImageCache:
    """Loaded images by file, size and modification time, least recently used out past ``max_bytes``.

    Cases often share images (the VQA pairs generated from one case all show its scans); a searcher
    decodes, resizes and hashes each file once. Safe to use from the loading threads.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._parts: OrderedDict[tuple, ImagePart] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> ImagePart | None:
        with self._lock:
            part = self._parts.get(key)
            if part is not None:
                self._parts.move_to_end(key)
            return part

    def put(self, key: tuple, part: ImagePart) -> None:
        with self._lock:
            if key in self._parts or len(part.data) > self.max_bytes:
                return
            self._parts[key] = part
            self._bytes += len(part.data)
            while self._bytes > self.max_bytes:
                _, evicted = self._parts.popitem(last=False)
                self._bytes -= len(evicted.data)


def _read_source(source: Any, base_dir: Path | None, max_pixels: int) -> tuple[bytes, str]:
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels, "<PIL image>")
        buffer = io.BytesIO()
        image = to_8bit(source)
        image = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        path, label = _resolve(source, base_dir)
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_FILE_BYTES:
                raise ImageError(f"image {label!r} is a {size / 2**20:,.0f} MiB file, above the "
                                 f"{MAX_IMAGE_FILE_BYTES // 2**20} MiB an image file may have; refused")
            with open(path, "rb") as handle:
                _check_header(handle, label, max_pixels)  # refuse too many pixels before reading the whole file
                handle.seek(0)
                return handle.read(), label
        except OSError as exc:
            raise ImageError(f"image {label!r} cannot be read: {exc.strerror or exc}") from exc
    raise ImageError(f"an image must be a path, bytes or a PIL image, not {type(source).__name__}")


def _check_header(data: Any, label: str, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels``, without decoding it. An unreadable
    header is left to the decode to report."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data) as image:
                width, height = image.size
    except Exception:
        return
    _check_pixels(width, height, max_pixels, label)


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"image {label!r} is {width}x{height} = {width * height:,} pixels, above the cap of "
            f"{max_pixels:,} (MICS_IMAGE_MAX_PIXELS); refused"
        )


def to_8bit(image: "PILImage") -> "PILImage":
    """16-bit and float scans (modes I;16, I, F) stretched to 8-bit grey: what resizing and the APIs take."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    image = image.convert("I") if image.mode.startswith("I;16") else image
    low, high = image.getextrema()
    scale = 255.0 / (high - low) if high > low else 1.0
    return image.point(lambda value: (value - low) * scale).convert("L")


def load_image_sync(
    source: ImageSource,
    *,
    max_side: int,
    max_pixels: int,
    base_dir: Path | None = None,
    cache: ImageCache | None = None,
) -> ImagePart:
    """Read, check, downscale if needed, and hash one image (blocking: call through a thread)."""
    if cache is None or not isinstance(source, (str, os.PathLike)):
        return _decode(source, max_side=max_side, max_pixels=max_pixels, base_dir=base_dir)
    path, label = _resolve(source, base_dir)
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, max_side, max_pixels)
    part = cache.get(key)
    if part is None:
        part = _decode(source, max_side=max_side, max_pixels=max_pixels, base_dir=base_dir)
        cache.put(key, part)
    return part if part.label == label else replace(part, label=label)


def _decode(source: ImageSource, *, max_side: int, max_pixels: int, base_dir: Path | None) -> ImagePart:
    from PIL import Image, UnidentifiedImageError

    data, label = _read_source(source, base_dir, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            _check_pixels(width, height, max_pixels, label)
            with decode_budget.hold(decode_cost(width, height, image.mode, len(data))):
                try:
                    return _finish(image, data, label, max_side)
                finally:
                    image.close()  # its buffer is freed before the budget is given back, not after
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"image {label!r} is not a supported image file ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"image {label!r} is corrupt and cannot be decoded ({exc})") from exc
    except MemoryError:
        raise ImageError(f"image {label!r} ({width}x{height}) does not fit in memory; lower MICS_IMAGE_MAX_PIXELS "
                         "or downscale it") from None


def _finish(image: "PILImage", data: bytes, label: str, max_side: int) -> ImagePart:
    """Decode, downscale if needed, re-encode if needed, and hash (under the decode budget)."""
    from PIL import Image, ImageOps

    width, height = image.size
    image_format = image.format or ""
    image.load()
    if max(width, height) > max_side or image_format not in _PASS_THROUGH:
        # Every step works on the one full-size buffer or on a smaller one: exif_transpose in place (it
        # copies otherwise), and a box reduction first (Pillow's resize would premultiply RGBA at full size).
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode.startswith("I;16"):
            image = image.convert("I")  # what resizing takes; stretched to 8 bits once small
        factor = max(image.size) // (2 * max_side)
        if factor >= 2:
            image = image.reduce(factor)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        image = to_8bit(image)
        keep_jpeg = image_format == "JPEG" and image.mode in ("RGB", "L")
        if not keep_jpeg and image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buffer = io.BytesIO()
        if keep_jpeg:
            image.save(buffer, format="JPEG", quality=92)
            mime = "image/jpeg"
        else:
            image.save(buffer, format="PNG")
            mime = "image/png"
        # The cache key names the original bytes and the resize settings, not the re-encoded bytes: those
        # change with the Pillow/zlib/libjpeg build, and an upgrade would make every resized image miss.
        key_sha256 = resized_image_key(hashlib.sha256(data).hexdigest(), max_side)
        data = buffer.getvalue()
        return ImagePart(data, mime, hashlib.sha256(data).hexdigest(), label, key_sha256=key_sha256)
    mime = _PASS_THROUGH[image_format]
    return ImagePart(data, mime, hashlib.sha256(data).hexdigest(), label)


# Bump when a change to the resizing above changes what a model is shown (not merely the bytes' encoding).
RESIZE_RECIPE = 1


def resized_image_key(original_sha256: str, max_side: int) -> str:
    """The cache key of an image resized (or re-encoded) from a file whose bytes hash to ``original_sha256``."""
    return hashlib.sha256(f"mics-image/{RESIZE_RECIPE}:{original_sha256}:max_side={max_side}".encode()).hexdigest()



def smaller_copy(part: ImagePart, max_side: int) -> ImagePart:
    """``part`` at most ``max_side`` pixels on its longest side (blocking: call through a thread).

    Made from an image already loaded (checked, oriented, downscaled), so a case's original files are read,
    decoded and hashed once however many sizes its roles get. The cache key derives from ``part``'s key and
    the size, stable across Pillow builds like every image key.
    """
    from PIL import Image

    with Image.open(io.BytesIO(part.data)) as image:
        if max(image.size) <= max_side:
            return part
        image.load()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return _resized_part(part, image, f"max_side={max_side}")


def _resized_part(part: ImagePart, image: Any, recipe: str) -> ImagePart:
    """``image`` (``part`` resized) encoded as ``part`` was where it can be (JPEG stays JPEG), else as PNG; its
    cache key derives from ``part``'s and the ``recipe`` of the resize."""
    buffer = io.BytesIO()
    if part.mime == "image/jpeg" and image.mode in ("RGB", "L"):
        image.save(buffer, format="JPEG", quality=92)
        mime = "image/jpeg"
    else:
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image.save(buffer, format="PNG")
        mime = "image/png"
    data = buffer.getvalue()
    key = hashlib.sha256(f"mics-image/{RESIZE_RECIPE}:{part.cache_id}:{recipe}".encode()).hexdigest()
    return ImagePart(data, mime, hashlib.sha256(data).hexdigest(), part.label, key_sha256=key)


def within_pixels(part: ImagePart, min_pixels: int, max_pixels: int) -> ImagePart:
    """``part`` scaled (aspect kept) so its pixel count lies within ``min_pixels``..``max_pixels`` (0: no
    bound on that side), the way a Qwen-VL processor's ``min_pixels``/``max_pixels`` budget scales an image
    (blocking: call through a thread). An image already within the budget is returned as it is, so its
    cache key does not change. The key of a scaled one derives from ``part``'s key and the budget."""
    import math

    from PIL import Image

    with Image.open(io.BytesIO(part.data)) as image:
        width, height = image.size
        pixels = width * height
        if max_pixels and pixels > max_pixels:
            factor = math.sqrt(max_pixels / pixels)
            size = (max(1, math.floor(width * factor)), max(1, math.floor(height * factor)))
        elif min_pixels and pixels < min_pixels:
            factor = math.sqrt(min_pixels / pixels)
            size = (math.ceil(width * factor), math.ceil(height * factor))
            if max_pixels and size[0] * size[1] > max_pixels:  # a budget whose bounds nearly meet
                size = (width, height)
        else:
            return part
        if size == (width, height):
            return part
        image.load()
        scaled = to_8bit(image).resize(size, Image.Resampling.LANCZOS)
        return _resized_part(part, scaled, f"pixels={min_pixels}-{max_pixels}")


async def load_images(
    sources: ImageSource | Sequence[ImageSource] | None,
    *,
    max_side: int,
    max_pixels: int,
    base_dir: Path | None = None,
    cache: ImageCache | None = None,
) -> list[ImagePart]:
    """Load images concurrently in worker threads. ``None`` gives no images; a single source one."""
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, os.PathLike)) or not isinstance(sources, Sequence):
        sources = [sources]  # type: ignore[list-item]
    return list(
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    load_image_sync, source, max_side=max_side, max_pixels=max_pixels, base_dir=base_dir, cache=cache
                )
                for source in sources
            )
        )
    )
