"""Self-supervised pre-training: the method base class, the registry, the one run loop, the methods."""
