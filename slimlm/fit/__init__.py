"""Fitting a model to a budget: presets and candidates from the registry, per-layer
sensitivity, a knapsack over layers, and the measured result (see run.py)."""
