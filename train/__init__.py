"""Training: the UNet, data sampling and augmentation, the training loop (torch)."""
