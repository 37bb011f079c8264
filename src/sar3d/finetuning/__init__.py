"""Fine-tuning one (task, init, label ratio, fold) on its split."""
