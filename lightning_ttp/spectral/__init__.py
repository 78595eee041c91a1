"""DAI compression scores over hidden-layer singular values (no Lightning)."""
