"""``actmon report``: one self-contained HTML file (plots inlined) from a run store.

The report only reads what the store holds; it computes no statistic of its own.
"""

from actmon.report.html import MAX_HEATMAPS, ReportError, write_report

__all__ = ["MAX_HEATMAPS", "ReportError", "write_report"]
