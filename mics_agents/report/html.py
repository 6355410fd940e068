"""The report as one self-contained HTML file: the page's CSS and JS inline, its data embedded as
base64 of gzipped JSON, no URL that reaches outside the file.

Why base64 of gzip: the data of 10,000 searches is tens of MB of JSON that compresses about tenfold, so the
file stays small enough to mail; the browser inflates it with ``DecompressionStream``. Base64 also means no
text of the data (a question holding ``</script>``) can end the script element it sits in. The page builds
its DOM with ``textContent`` only, and a Content-Security-Policy allows just its own script and style (by
hash), inline images and nothing else, so even a mistake could neither run injected code nor fetch.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

from .data import DEFAULT_THUMBNAIL_SIZE, ReportData, build_report_data

__all__ = ["render_html", "write_report"]

_ASSETS = resources.files(__package__) / "assets"


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def encode_payload(data: ReportData) -> str:
    """The page's data: JSON, gzipped (fixed mtime, so the same run gives the same file), base64."""
    text = json.dumps(data.payload(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # A lone surrogate (from a "\ud800" escape in a record) has no UTF-8 form: it becomes "?".
    packed = gzip.compress(text.encode("utf-8", errors="replace"), compresslevel=5, mtime=0)
    encoded = base64.b64encode(packed).decode("ascii")
    return "\n".join(encoded[start:start + 4096] for start in range(0, len(encoded), 4096))


def render_html(data: ReportData) -> str:
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
        ("__TITLE__", html.escape(data.title, quote=False)),
        ("/*__STYLE__*/", style),
        ("__DATA__", encode_payload(data)),
        ("/*__SCRIPT__*/", script),
    ):
        before, found, rest = rest.partition(marker)
        if not found:
            raise RuntimeError(f"the report template lost its {marker} marker")
        parts += [before, value]
    return "".join(parts) + rest


def write_report(
    output: Path,
    html_path: Path,
    *,
    failed: Path | None = None,
    image_dir: Path | None = None,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    title: str | None = None,
) -> ReportData:
    """Read a run's files and write its report to ``html_path`` (atomically). Returns the report's data."""
    data = build_report_data(output, failed, image_dir=image_dir, thumbnail_size=thumbnail_size, title=title)
    page = render_html(data)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=html_path.parent, prefix=f".{html_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(page)
        os.replace(temporary, html_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return data
