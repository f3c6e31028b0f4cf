"""cmssft: cross-modality person re-identification with shared-specific feature transfer."""

__version__ = "0.1.0"
