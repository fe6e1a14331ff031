"""The run report: report.html and the figures."""
