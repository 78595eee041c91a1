"""Lightning callbacks (the only layer that imports Lightning)."""
