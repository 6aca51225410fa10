"""The evaluation report: self-contained HTML (jinja2) with matplotlib figures as inline PNG."""

from medvae.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]
