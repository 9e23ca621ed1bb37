"""Training: datasets, losses, the training loop, configs and export."""
