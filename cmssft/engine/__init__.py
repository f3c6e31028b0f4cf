"""Training loop, checkpoints, run directories, logging and feature extraction."""
