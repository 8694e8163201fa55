"""Cache statistics: plain counters per layer, summed on demand into a snapshot."""

from dataclasses import asdict, dataclass, field, fields

from ..model.layout import SliceKey


@dataclass
class Counts:
    """Counters for one layer or in total.

    hits: pins of a resident slice; joins: pins that waited on a load already in flight; misses: pins that
    started a load. prefetch_hits: pins whose slice a prefetch loaded (resident or in flight), counted once per
    prefetch. prefetch_wasted: prefetched slices evicted unused; prefetch_cancelled: queued prefetches dropped
    by cancel or taken over by a demand load before they started; prefetch_dropped: prefetches skipped for want
    of an evictable slot. bytes_read: slice bytes paged in; read_seconds: time spent reading, summed over
    threads; stall_seconds: time callers waited for loads.
    """

    hits: int = 0
    joins: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    prefetch_issued: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    prefetch_dropped: int = 0
    evictions: int = 0
    load_errors: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    stall_seconds: float = 0.0

    @property
    def pins(self) -> int:
        return self.hits + self.joins + self.misses

    @property
    def hit_rate(self) -> float:
        """Fraction of pins served without waiting."""
        return self.hits / self.pins if self.pins else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        """Fraction of prefetches that a pin then used."""
        return self.prefetch_hits / self.prefetch_issued if self.prefetch_issued else 0.0

    @property
    def read_gbps(self) -> float:
        """Read throughput per reading thread, in 10^9 bytes per second."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0

    def since(self, before: "Counts") -> "Counts":
        """The counts added after `before` was taken (a window of work, e.g. one request)."""
        return Counts(**{name: getattr(self, name) - getattr(before, name) for name in COUNTERS})

    def to_dict(self) -> dict:
        return {**asdict(self), "pins": self.pins, "hit_rate": self.hit_rate,
                "prefetch_hit_rate": self.prefetch_hit_rate, "read_gbps": self.read_gbps}


@dataclass
class StatsSnapshot(Counts):
    """Expert slice totals plus the same counters per layer; `adapters`: the same counters for adapter pieces
    (keys longer than (layer, expert)), which share the cache but not these totals."""

    per_layer: dict[int, Counts] = field(default_factory=dict)
    adapters: Counts = field(default_factory=Counts)

    def to_dict(self) -> dict:
        out = {k: v for k, v in super().to_dict().items() if k not in ("per_layer", "adapters")}
        out["per_layer"] = {layer: c.to_dict() for layer, c in self.per_layer.items()}
        out["adapters"] = self.adapters.to_dict()
        return out


COUNTERS = tuple(f.name for f in fields(Counts))


class Stats:
    """Live counters: `counters[name][row]`, one row per layer of expert slices and a last row for adapter pieces,
    incremented by the caller (under its lock)."""

    def __init__(self, keys) -> None:
        self.layers = sorted({k[0] for k in keys})
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.counters: dict[str, list] = {name: [0] * (len(self.layers) + 1) for name in COUNTERS}

    def row(self, key: tuple) -> int:
        """The counter row of a key: its layer's for an expert slice, the last for an adapter piece."""
        return self.index[key[0]] if len(key) == 2 else len(self.layers)

    def add(self, name: str, key: SliceKey, amount: float = 1) -> None:
        self.counters[name][self.row(key)] += amount

    def snapshot(self) -> StatsSnapshot:
        n = len(self.layers)
        per_layer = {
            layer: Counts(**{name: values[i] for name, values in self.counters.items()})
            for i, layer in enumerate(self.layers)
        }
        adapters = Counts(**{name: values[n] for name, values in self.counters.items()})
        return StatsSnapshot(**{name: sum(values[:n]) for name, values in self.counters.items()}, per_layer=per_layer,
                             adapters=adapters)
