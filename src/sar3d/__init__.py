"""sar3d: Scale-Aware Restoration pre-training for 3D tumour segmentation, as a reproducible study."""

__version__ = "0.1.0"
