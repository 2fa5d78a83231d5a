"""tcube-lightning: T³ test-time model merging of medical CLIP models, as a Lightning evaluation module."""

__version__ = "0.1.0"
