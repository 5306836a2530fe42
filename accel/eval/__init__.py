"""Evaluation: side-by-side timing, agreement metrics and report tables."""
