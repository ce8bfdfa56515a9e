"""The HTML report: `build_report(RUN_OR_STUDY_DIR)` writes a self-contained report.html."""

from redline.study.report.build import REPORT, ReportError, build_report

__all__ = ["REPORT", "ReportError", "build_report"]
