"""Training machinery shared by pre-training and fine-tuning: devices, DDP, checkpoints, metering, the epoch loop."""
