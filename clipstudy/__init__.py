"""clipstudy: how optimizers and loss functions change CLIP training."""

__version__ = "0.1.0"
