"""Plots of predicted vs. real curves and of spectra (needs the ``plots`` extra)."""
