"""The report as one self-contained HTML file: the page's CSS and JS inline, its data embedded as
base64 of gzipped JSON, no URL that reaches outside the file.

Why base64 of gzip: the data of 10,000 searches is tens of MB of JSON that compresses about tenfold, so the
file stays small enough to mail; the browser inflates it with ``DecompressionStream``. Base64 also means no
text of the data (a question holding ``</script>``) can end the script element it sits in. The page builds
its DOM with ``textContent`` only, and a Content-Security-Policy allows just its own script and style (by
hash), inline images and nothing else, so even a mistake could neither run injected code nor fetch.

The data is written as it is made, so memory stays flat in the number of items: each item's JSON goes into
a scratch file (compressed fast) as the run is read, since the summary that comes before the items in the
data is known only at the end; then the summary, the items poured back from the scratch file and the
thumbnails go through one gzip stream into the page. The bytes are those of compressing the whole JSON at
once.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import IO, Any

from .data import DEFAULT_THUMBNAIL_SIZE, ReportData, run_files, stream_report_data

__all__ = ["render_html", "write_report", "encode_payload"]

_ASSETS = resources.files(__package__) / "assets"
_GZIP_LEVEL = 5
_LINE_CHARS = 4096  # base64 characters a line of the embedded data
_LINE_BYTES = _LINE_CHARS // 4 * 3
_TEXT_BUFFER = 1 << 16


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _utf8(text: str) -> bytes:
    # A lone surrogate (from a "\ud800" escape in a record) has no UTF-8 form: it becomes "?".
    return text.encode("utf-8", errors="replace")


class _PayloadWriter:
    """JSON text in; gzip (fixed mtime, so the same run gives the same file), base64, in lines of 4096
    characters, out to ``write``. Byte for byte what compressing the whole text at once gives."""

    def __init__(self, write: Callable[[str], Any]) -> None:
        self._write = write
        self._compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: a gzip header, mtime 0
        self._text: list[str] = []
        self._text_size = 0
        self._packed = bytearray()
        self._lines = 0

    def text(self, text: str) -> None:
        self._text.append(text)
        self._text_size += len(text)
        if self._text_size >= _TEXT_BUFFER:
            self._flush_text()

    def raw(self, data: bytes) -> None:
        """UTF-8 bytes of JSON text, already encoded as :func:`_utf8` does."""
        self._flush_text()
        self._pack(self._compressor.compress(data))

    def close(self) -> None:
        self._flush_text()
        self._pack(self._compressor.flush())
        if self._packed:
            self._emit(bytes(self._packed))
            self._packed.clear()

    def _flush_text(self) -> None:
        if self._text:
            data = _utf8("".join(self._text))
            self._text.clear()
            self._text_size = 0
            self._pack(self._compressor.compress(data))

    def _pack(self, packed: bytes) -> None:
        self._packed += packed
        whole = len(self._packed) // _LINE_BYTES * _LINE_BYTES
        if whole:
            self._emit(bytes(self._packed[:whole]))
            del self._packed[:whole]

    def _emit(self, block: bytes) -> None:
        encoded = base64.b64encode(block).decode("ascii")
        for start in range(0, len(encoded), _LINE_CHARS):
            self._write(("\n" if self._lines else "") + encoded[start:start + _LINE_CHARS])
            self._lines += 1


class _ItemSpool:
    """The items' JSON (comma-separated, as in the list), compressed fast into a scratch file until the
    summary that comes before them is known."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, prefix=".mics-report-items-")
        self._compressor = zlib.compressobj(1)
        self._text: list[str] = []
        self._text_size = 0
        self._count = 0

    def add(self, item: dict[str, Any]) -> None:
        text = _dumps(item)
        self._text.append("," + text if self._count else text)
        self._count += 1
        self._text_size += len(text)
        if self._text_size >= _TEXT_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._text:
            self._file.write(self._compressor.compress(_utf8("".join(self._text))))
            self._text.clear()
            self._text_size = 0

    def pour(self) -> Iterator[bytes]:
        """The spooled bytes, a bounded chunk at a time (read once)."""
        self._flush()
        self._file.write(self._compressor.flush())
        self._file.seek(0)
        inflater = zlib.decompressobj()
        while True:
            packed = inflater.unconsumed_tail or self._file.read(_TEXT_BUFFER)
            if not packed:
                break
            chunk = inflater.decompress(packed, _TEXT_BUFFER * 4)
            if chunk:
                yield chunk
        rest = inflater.flush()
        if rest:
            yield rest

    def close(self) -> None:
        self._file.close()


def _write_payload(out: _PayloadWriter, head: dict[str, Any], items: Iterable[bytes],
                   images: Iterable[tuple[str, str | None]], warnings: list[str]) -> None:
    """The page's data as ``json.dumps`` of ``{**head, "items": ..., "images": ..., "warnings": ...}`` would
    write it; ``warnings`` is read after ``images`` is exhausted (making thumbnails can add to it)."""
    out.text(_dumps(head)[:-1] + ',"items":[')
    for chunk in items:
        out.raw(chunk)
    out.text('],"images":{')
    for index, (path, url) in enumerate(images):
        out.text(("," if index else "") + _dumps(path) + ":" + _dumps(url))
    out.text('},"warnings":' + _dumps(warnings) + "}")
    out.close()


def _items_json(items: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for index, item in enumerate(items):
        yield _utf8(("," if index else "") + _dumps(item))


def encode_payload(data: ReportData) -> str:
    """The page's data: JSON, gzipped (fixed mtime, so the same run gives the same file), base64."""
    lines: list[str] = []
    _write_payload(_PayloadWriter(lines.append), data.head(), _items_json(data.items), data.images.items(),
                   data.warnings)
    return "".join(lines)


def _page(title: str) -> tuple[str, str]:
    """The page before its data and after it."""
    style = _asset("report.css")
    script = _asset("report.js")
    policy = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}; script-src {_csp_hash(script)}; "
        "base-uri 'none'; form-action 'none'"
    )
    # Markers are filled in page order, each searched for only after the previous value, so text in a
    # value (a title that reads "__DATA__") is never taken for a marker.
    parts: list[str] = []
    rest = _asset("page.html")
    for marker, value in (
        ("__CSP__", html.escape(policy, quote=False).replace('"', "&quot;")),
        ("__TITLE__", html.escape(title, quote=False)),
        ("/*__STYLE__*/", style),
        ("__DATA__", None),
        ("/*__SCRIPT__*/", script),
    ):
        before, found, rest = rest.partition(marker)
        if not found:
            raise RuntimeError(f"the report template lost its {marker} marker")
        if value is None:
            parts.append(before)
            head, parts = "".join(parts), []
        else:
            parts += [before, value]
    return head, "".join(parts) + rest


def render_html(data: ReportData) -> str:
    head, tail = _page(data.title)
    return head + encode_payload(data) + tail


def write_report(
    output: Path,
    html_path: Path,
    *,
    failed: Path | None = None,
    image_dir: Path | None = None,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    title: str | None = None,
) -> ReportData:
    """Read a run's files and write its report to ``html_path`` (atomically). Returns the report's data:
    its ``items`` are read again from the run's files if gone through, its thumbnails are in the page only.

    Memory stays flat in the number of items: see the module doc."""
    run_files(output, failed)  # a run that is not there is an error before any folder is made
    html_path.parent.mkdir(parents=True, exist_ok=True)
    spool = _ItemSpool(html_path.parent)
    try:
        streamed = stream_report_data(output, failed, sink=spool.add, image_dir=image_dir,
                                      thumbnail_size=thumbnail_size, title=title)
        data = streamed.data
        head, tail = _page(data.title)
        handle, temporary = tempfile.mkstemp(dir=html_path.parent, prefix=f".{html_path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
                stream.write(head)
                _write_payload(_PayloadWriter(stream.write), streamed.head, spool.pour(), streamed.images,
                               data.warnings)
                stream.write(tail)
            os.replace(temporary, html_path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    finally:
        spool.close()
    return data
