"""lightning_ttp: predict fine-tuning time before training, and give up early on runs that will fail."""

__version__ = "0.1.0"
