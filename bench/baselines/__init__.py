"""Baseline servers that `vivace bench` measures Vivace against, in the same run."""
