"""Ray does the cluster work: it places shard replicas (a placement group per shard spreads its
replicas over distinct nodes when there are enough), restarts dead replica actors, and carries
the calls. nestvec adds only what Ray has no notion of: which data a replica holds and how it
catches up (nestvec.cluster.distributed)."""

from __future__ import annotations

import hashlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

from nestvec.errors import UnavailableError, invalid
from nestvec.types import JSONDict

log = logging.getLogger(__name__)

NAMESPACE = "nestvec"
CONNECT_TIMEOUT_S = 3.0   # a Ray address must answer within this, or connecting fails (ray.init would wait)
PLACE_TIMEOUT_S = 20.0    # a placement group not ready by then cannot be placed: an error, not a hang
REPLICA_CONCURRENCY = 4   # calls one replica actor serves at once (searches in parallel; writes take a lock)


@dataclass
class Replica:
    """One replica actor as the front door sees it."""

    shard: int
    index: int
    actor: Any
    live: bool = True

    @property
    def label(self) -> str:
        return f"shard {self.shard} replica {self.index}"


def _check_address(address: str) -> None:
    """ray.init retries an address that does not answer for a long time: fail within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise invalid("ray", f"{address!r} is not host:port, 'auto' or empty (a local Ray)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UnavailableError(f"Ray at {address} does not answer ({err}); start one with `ray start --head`") \
            from None


class RayBackend:
    """A connection to a Ray cluster: `address` None, "" or "local" starts (or joins) a Ray in
    this process, "auto" joins the one `ray start` made on this machine, "host:port" a head node."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None) -> None:
        import ray

        self.address = None if address in (None, "", "local") else address
        if self.address not in (None, "auto"):
            _check_address(str(self.address))
        try:
            ray.init(address=self.address, namespace=NAMESPACE, ignore_reinit_error=True, include_dashboard=False,
                     log_to_driver=False, num_cpus=num_cpus if self.address is None else None,
                     configure_logging=False)
        except ConnectionError as err:
            raise UnavailableError(f"cannot join Ray at {self.address or 'a local instance'}: {err}") from None
        self.ray = ray

    def nodes(self) -> list[str]:
        return [n["NodeID"] for n in self.ray.nodes() if n["Alive"]]

    def open_replicas(self, key: str, config: JSONDict, shards: int, replicas: int, root: str) -> list[list[Replica]]:
        """Create (or find, when they are running already) the replica actors of a collection.
        `key` names the collection uniquely in the cluster; replica folders are made under
        `root` on whichever node each replica lands."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from nestvec.cluster.replica import ShardReplica

        nodes = len(self.nodes())
        if replicas > 1 and 1 < nodes < replicas:
            raise invalid("replicas", f"{replicas} replicas of a shard go on {replicas} distinct nodes; "
                                      f"this cluster has {nodes}")
        actor_class = self.ray.remote(ShardReplica)
        out: list[list[Replica]] = []
        for shard in range(shards):
            strategy = None
            if replicas > 1 and nodes >= replicas:
                group = placement_group([{"CPU": 0.01}] * replicas, strategy="STRICT_SPREAD",
                                        name=f"{key}/s{shard}", lifetime=None)
                ready, _ = self.ray.wait([group.ready()], timeout=PLACE_TIMEOUT_S)
                if not ready:
                    self.ray.util.remove_placement_group(group)
                    raise invalid("replicas", f"Ray cannot place {replicas} replicas of shard {shard} on distinct "
                                              f"nodes within {PLACE_TIMEOUT_S:.0f} s")
                strategy = group
            row = []
            for index in range(replicas):
                options: dict[str, Any] = {
                    "name": f"{key}/s{shard}r{index}", "get_if_exists": True, "num_cpus": 0,
                    "max_restarts": -1, "max_task_retries": 0, "max_concurrency": REPLICA_CONCURRENCY}
                if strategy is not None:
                    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(strategy, index)
                actor = actor_class.options(**options).remote(f"{root}/s{shard}-r{index}", config)
                row.append(Replica(shard, index, actor))
            out.append(row)
        return out

    def kill(self, replica: Replica, *, restart: bool) -> None:
        self.ray.kill(replica.actor, no_restart=not restart)


def collection_key(folder: str, name: str) -> str:
    """Actor names are cluster-wide: the collection's name plus a digest of its data folder."""
    return f"{name}-{hashlib.blake2b(folder.encode(), digest_size=4).hexdigest()}"
