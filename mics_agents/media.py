"""Images by reference: each prepared image written once into a folder that a local model server reads, so a
request names the file (a ``file://`` URL) instead of carrying the image's base64.

A vLLM server started with ``--allowed-local-media-path FOLDER`` reads ``file://`` URLs inside FOLDER itself
(``mics serve`` starts it so when its config names a ``media_dir``). The file holds exactly the bytes a data URL
would have carried (the image as prepared: resized, re-encoded, 16-bit stretched), never the original file, so
the server sees the same image and the cache key (which hashes the prepared image, never the URL) stays right.

Files are content-addressed (``<sha256 of the bytes>.<ext>``), written aside and renamed into place, so two
processes writing one image both leave a whole file with the same bytes, and a reader never sees a part of
one. Writing is blocking: :class:`~mics_agents.models.direct.DirectTransport` does it in a worker thread, once
per image and folder (the content part is kept on the image after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
from pathlib import Path

from .models.base import ImagePart

__all__ = ["MediaFolder", "media_file_name"]

_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def media_file_name(data: bytes, mime: str, sha256: str = "") -> str:
    """The file an image's bytes are kept under: their sha256 (``sha256`` when it is one, as an
    :class:`ImagePart` carries it from loading; else computed), and an extension for the people who look."""
    digest = sha256 if _SHA256.fullmatch(sha256) else hashlib.sha256(data).hexdigest()
    return digest + _EXTENSIONS.get(mime, ".img")


class MediaFolder:
    """A folder of prepared images that a model server reads by ``file://`` URL.

    ``path`` is resolved (symlinks followed) once, here: vLLM checks that a URL's path, resolved, lies inside
    its ``--allowed-local-media-path``, so URLs name the resolved folder, as ``mics serve`` passes it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self.key = str(self.path)

    def __repr__(self) -> str:
        return f"MediaFolder({self.key!r})"

    def ready(self, image: ImagePart) -> bool:
        """Whether ``image``'s file is written and its content part made (then :meth:`json_part` does no I/O)."""
        return image.reference_part(self.key) is not None

    def json_part(self, image: ImagePart) -> bytes:
        """``image``'s OpenAI content part naming its file here, as JSON bytes; the file is written first if
        this process has not made sure of it yet (blocking: call through a thread unless :meth:`ready`)."""
        part = image.reference_part(self.key)
        if part is None:
            url = self.store(image).as_uri()  # percent-encoded: no character JSON must escape
            part = b'{"type":"image_url","image_url":{"url":' + json.dumps(url).encode("ascii") + b"}}"
            image.keep_reference_part(self.key, part)
        return part

    def store(self, image: ImagePart) -> Path:
        """Write ``image``'s bytes to their file here unless a file with exactly those bytes is there; its path.

        Raises OSError when the folder cannot be made or written."""
        target = self.path / media_file_name(image.data, image.mime, image.sha256)
        if _holds(target, image.data):
            return target
        self.path.mkdir(parents=True, exist_ok=True)
        # A name of this writer's own, in the same folder (a rename within a file system is atomic); created
        # exclusively with the permissions an ordinary write gets (the umask's).
        aside = self.path / f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.part"
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(image.data)
            os.replace(aside, target)
        except BaseException:
            try:
                aside.unlink()
            except OSError:
                pass
            raise
        return target


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file with exactly ``data`` (a file left by a crash, or changed by hand, is
    rewritten rather than trusted by its name)."""
    try:
        if path.is_symlink() or path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
