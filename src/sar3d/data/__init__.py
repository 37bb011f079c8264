"""Data stages: download, conversion, normalisation, splits, cubes and the pre-training loaders."""
