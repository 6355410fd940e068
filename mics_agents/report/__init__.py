"""``mics report``: one self-contained HTML page showing how a run went and every search tree in it."""

from __future__ import annotations

from .data import DEFAULT_THUMBNAIL_SIZE, STATUSES, ReportData, build_report_data, run_files, thumbnail_data_url
from .html import render_html, write_report

__all__ = [
    "DEFAULT_THUMBNAIL_SIZE",
    "STATUSES",
    "ReportData",
    "build_report_data",
    "render_html",
    "run_files",
    "thumbnail_data_url",
    "write_report",
]
