"""Datasets, samplers, transforms and the synthetic data generator."""
