"""sfnn: fast kernels for block-sparse feed-forward layers selected by Avg-K."""
__version__ = "0.1.0"
