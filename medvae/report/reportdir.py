"""An evaluation's report directory (``medvae evaluate --out``, a pipeline's ``RUN/report``): the one
owner of its layout, and its one writer.

    OUT/metrics.csv     the tidy metric rows
    OUT/summary.json    every number of the report
    OUT/report.html     the self-contained page

The reconstruction evaluation and the denoise evaluation write the same three files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from medvae.files import write_json, write_text

log = logging.getLogger(__name__)


class ReportDir:
    """The report directory ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = self.path / "metrics.csv"
        self.summary = self.path / "summary.json"
        self.html = self.path / "report.html"

    def write(self, metrics_csv: str, summary: dict, write_html: Callable[[Path], None]) -> None:
        """metrics.csv, summary.json, then report.html (``write_html(path)`` renders it), each atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.metrics, metrics_csv)
        write_json(self.summary, summary)
        write_html(self.html)
        log.info("wrote %s, %s and %s", self.metrics, self.summary, self.html)
