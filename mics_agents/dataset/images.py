"""Image facts for dataset building (hash and size), each file read once, plus the shared image folder
the exports point into."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["ImageInfo", "ImageCatalog", "posix_relpath"]


def posix_relpath(path: Path | str, start: Path | str) -> str:
    """``path`` relative to ``start``, with forward slashes: what ``Path(os.path.relpath(...)).as_posix()``
    gives, without a Path (which interns every part of it for good: a build names one file per image)."""
    return os.path.relpath(path, start).replace(os.sep, "/")


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    sha256: str
    width: int
    height: int
    suffix: str


class ImageCatalog:
    """Resolves image paths against a folder, refusing escapes, and remembers what it read."""

    def __init__(self) -> None:
        self._infos: dict[Path, ImageInfo | None] = {}

    def lookup(self, relative: str, base_dir: Path) -> ImageInfo | None:
        """Hash and size of ``base_dir/relative``, or None if missing, outside ``base_dir`` or unreadable."""
        base = base_dir.resolve()
        path = (base / relative).resolve()
        if not path.is_relative_to(base):
            return None
        return self.info(path)

    def info(self, path: Path) -> ImageInfo | None:
        if path in self._infos:
            return self._infos[path]
        info = None
        if path.is_file():
            try:
                data = path.read_bytes()
                with Image.open(path) as image:
                    width, height = image.size
                info = ImageInfo(path, hashlib.sha256(data).hexdigest(), width, height, path.suffix.lower() or ".png")
            except (OSError, SyntaxError, ValueError):
                info = None
        self._infos[path] = info
        return info

    def place(self, info: ImageInfo, images_root: Path) -> Path:
        """Put the image into ``images_root`` under its content hash (hard link, else copy); returns the path."""
        target = images_root / info.sha256[:2] / f"{info.sha256}{info.suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(info.path, target)
            except OSError:
                shutil.copyfile(info.path, target)
        return target
