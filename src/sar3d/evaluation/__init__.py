"""Evaluation: the per-job test-set evaluation (metrics are in :mod:`sar3d.metrics`, shared with fine-tuning)."""
