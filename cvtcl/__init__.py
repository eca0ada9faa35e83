"""CVTCL: cross-view temporal contrastive learning for self-supervised video representation."""

__version__ = "0.1.0"
