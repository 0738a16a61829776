"""clipstore: encrypted voice-clip storage with audited, MFA-gated review."""

__all__ = ["__version__"]
__version__ = "0.1.0"
