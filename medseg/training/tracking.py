"""Experiment trackers beside TensorBoard (placeholder, filled in below)."""
