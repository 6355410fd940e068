"""Loading case images: from a path, bytes or a PIL image to an encoded, hashed :class:`ImagePart`.

Decoding, resizing and hashing are CPU and disk work, so they run in a worker thread, never on the
event loop. Each image is hashed once, here; the cache key uses that hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import ImageError
from .models.base import ImagePart

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["ImageSource", "ImageCache", "load_images", "load_image_sync"]

ImageSource = Union[str, os.PathLike, bytes, "PILImage"]

# Formats every vision API accepts as they are; anything else is re-encoded as PNG.
_PASS_THROUGH = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def _resolve(source: str | os.PathLike, base_dir: Path | None) -> tuple[Path, str]:
    """The file an image path names (refusing one that leaves ``base_dir``), and its label."""
    path = Path(source)
    label = str(source)
    if base_dir is not None:
        root = base_dir.resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise ImageError(f"image {label!r} points outside the image folder {str(base_dir)!r}; refused")
    if not path.is_file():
        raise ImageError(f"image {label!r} not found (looked at {str(path)!r})")
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


def _read_source(source: Any, base_dir: Path | None) -> tuple[bytes, str]:
    from PIL import Image

    if isinstance(source, Image.Image):
        buffer = io.BytesIO()
        image = source if source.mode in ("RGB", "RGBA", "L", "LA") else source.convert("RGB")
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "<PIL image>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        path, label = _resolve(source, base_dir)
        try:
            return path.read_bytes(), label
        except OSError as exc:
            raise ImageError(f"image {label!r} cannot be read: {exc.strerror or exc}") from exc
    raise ImageError(f"an image must be a path, bytes or a PIL image, not {type(source).__name__}")


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
    from PIL import Image, ImageOps, UnidentifiedImageError

    data, label = _read_source(source, base_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image {label!r} is {width}x{height} = {width * height:,} pixels, above the cap of "
                    f"{max_pixels:,} (MICS_IMAGE_MAX_PIXELS); refused"
                )
            image_format = image.format or ""
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"image {label!r} is not a supported image file ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {label!r} is corrupt and cannot be decoded ({exc})") from exc

    if max(width, height) > max_side or image_format not in _PASS_THROUGH:
        image = ImageOps.exif_transpose(image)
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
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
