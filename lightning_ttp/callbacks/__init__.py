"""Lightning callbacks (the only layer that imports Lightning)."""

from .early_give_up import EarlyGiveUp

__all__ = ["EarlyGiveUp"]
