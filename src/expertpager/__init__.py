"""expertpager: run mixture-of-experts models larger than memory by paging expert slices from disk."""

from .errors import ExpertPagerError

__version__ = "0.1.0"
__all__ = ["ExpertPagerError", "__version__", "load"]


def __getattr__(name: str):
    """`expertpager.load` imports torch and transformers only when first used."""
    if name == "load":
        from .runtime.load import load

        return load
    raise AttributeError(f"module 'expertpager' has no attribute {name!r}")
