"""``/metrics`` with data-parallel replicas: the engine counts summed, and each replica's own.

Every replica sends its own counts (``Engine.stats``) with its update
batches. The server-wide gauges of ``metrics.py`` show their sums; the
``ladder:replica_*`` gauges, labelled ``replica``, show each replica's
(``ladder:replica_up`` is 0 once one is down), and
``ladder:replica_requests`` counts what the router sent to each.
"""

from prometheus_client import Counter, Gauge

from .metrics import ServerMetrics


class ReplicaMetrics(ServerMetrics):
    """ServerMetrics for ``replicas`` engine replicas."""

    def __init__(self, replicas: int):
        super().__init__()
        registry = self.registry
        self.replica_up = Gauge("ladder:replica_up", "1 while the replica serves, 0 once it is down", ["replica"],
                                registry=registry)
        self.replica_running = Gauge("ladder:replica_running_reqs", "Requests in the replica's running batch", ["replica"],
                                     registry=registry)
        self.replica_waiting = Gauge("ladder:replica_queue_reqs", "Requests waiting in the replica", ["replica"],
                                     registry=registry)
        self.replica_requests = Counter("ladder:replica_requests", "Requests the router sent to the replica", ["replica"],
                                        registry=registry)
        for replica in range(replicas):
            self.replica_up.labels(str(replica)).set(1)
            self.replica_requests.labels(str(replica))
        self._stats: dict[int, dict[str, int]] = {}  # each replica's latest counts

    def observe_stats(self, stats: dict[str, int], replica: int = 0) -> None:
        """A replica's counts, sent with every update batch; the server-wide gauges show their sums."""
        if not stats:
            return
        self.replica_running.labels(str(replica)).set(stats["running"])
        self.replica_waiting.labels(str(replica)).set(stats["waiting"])
        self._stats[replica] = stats
        super().observe_stats({key: sum(s[key] for s in self._stats.values()) for key in stats})

    def engine_restarted(self, replica: int = 0) -> None:
        """A replica's new engine process counts from zero: its old one's tokens stay counted."""
        self._generated_before += self._stats.pop(replica, {}).get("generated_tokens", 0)
        self.replica_up.labels(str(replica)).set(1)

    def replica_down(self, replica: int) -> None:
        """A replica died: nothing of it runs or waits any more (its generated tokens still count)."""
        if replica in self._stats:
            self._stats[replica] = dict(self._stats[replica], running=0, waiting=0, pages_used=0, pages_cached=0,
                                        pages_total=0)
        self.replica_up.labels(str(replica)).set(0)
        self.replica_running.labels(str(replica)).set(0)
        self.replica_waiting.labels(str(replica)).set(0)
