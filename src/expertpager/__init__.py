"""expertpager: run mixture-of-experts models larger than memory by paging expert slices from disk."""

from .errors import ExpertPagerError

__version__ = "0.1.0"
__all__ = ["ExpertPagerError", "__version__"]
