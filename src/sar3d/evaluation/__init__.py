"""Evaluation: cases, segmentation metrics and the per-job evaluation."""
