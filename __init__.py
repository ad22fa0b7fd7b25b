"""wanimate: an optimized deployment engine for Wan2.2-Animate-14B."""

__version__ = "0.1.0"
