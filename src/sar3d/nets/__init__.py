"""Networks: the shared U-Net, the auxiliary heads, weight files."""
