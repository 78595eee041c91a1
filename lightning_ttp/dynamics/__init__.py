"""Function-space simulation of training on an empirical NTK (no Lightning, no models)."""
