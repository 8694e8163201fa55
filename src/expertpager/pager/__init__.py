"""The pager: expert slices moved between storage and a RAM cache of fixed byte budget. Knows nothing of
transformers; depends only on the layout records."""

from .cache import PinnedSlices, SliceBuffer, SliceCache
from .decode import Decoder
from .io import MODES as IO_MODES
from .io import drop_page_cache
from .policies import LFU, LRU, POLICIES, Belady, LayerCycle, Policy, make_policy
from .pool import plan_slots
from .reads import ReadPlan, plan_reads
from .replay import ReplayResult, Step, replay, replay_steps
from .stats import Counts, StatsSnapshot
from .verify import checksum_verifier

__all__ = [
    "SliceCache", "drop_page_cache", "SliceBuffer", "PinnedSlices", "Decoder", "IO_MODES",
    "Policy", "LRU", "LFU", "LayerCycle", "Belady", "POLICIES", "make_policy",
    "plan_slots", "plan_reads", "ReadPlan", "replay", "replay_steps", "Step", "ReplayResult", "Counts", "StatsSnapshot",
    "checksum_verifier",
]
