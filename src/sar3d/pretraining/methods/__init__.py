"""One module per pre-training method; each registers itself in :mod:`sar3d.pretraining.registry`."""
