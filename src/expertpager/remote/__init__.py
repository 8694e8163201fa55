"""Remote checkpoints: references (hf://, https://), HTTP range reads with retries, and a local store of fetched
slices under a disk budget. The pager knows nothing of this: the runtime hands it the store's `hold` and
`announce`."""

from .http import RangeClient
from .open import default_store, open_store, resolve_layout
from .refs import is_remote
from .store import Store, StoreStats

__all__ = ["RangeClient", "Store", "StoreStats", "default_store", "is_remote", "open_store", "resolve_layout"]
