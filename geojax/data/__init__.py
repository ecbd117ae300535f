"""Datasets: built-in synthetic scenes (and, later, real formats and Grain pipelines)."""
