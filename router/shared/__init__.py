"""Router replicas sharing worker load and membership through Redis (DESIGN.md "Scale"); see docs/replicas.md.

Map: `common` (config, client, key names, backoff), `load_sync` (per-worker load published and folded
in), `membership` (admin add/remove/drain seen by every replica), `records` (optional: cache_aware's
routing records on a capped stream), `runtime` (one replica's parts as a unit).
"""

from kvroute.router.shared.common import Keys, ReplicaConfig, SharedStateError, connect
from kvroute.router.shared.inflight import InflightShare, inflight_sink
from kvroute.router.shared.load_sync import LoadVector, RemoteLoadFolder, ReplicaStateSync
from kvroute.router.shared.membership import (
    MembershipChange,
    MembershipListener,
    Op,
    RegistryMembership,
    SharedMembership,
    WorkerSpec,
)
from kvroute.router.shared.policy import PolicyChange, SharedPolicy
from kvroute.router.shared.records import RoutingRecordShare, cache_aware_sink
from kvroute.router.shared.runtime import ReplicaRuntime, replica_context

__all__ = [
    "InflightShare",
    "Keys",
    "LoadVector",
    "MembershipChange",
    "MembershipListener",
    "Op",
    "PolicyChange",
    "RegistryMembership",
    "RemoteLoadFolder",
    "ReplicaConfig",
    "ReplicaRuntime",
    "ReplicaStateSync",
    "RoutingRecordShare",
    "SharedMembership",
    "SharedPolicy",
    "SharedStateError",
    "WorkerSpec",
    "cache_aware_sink",
    "connect",
    "inflight_sink",
    "replica_context",
]
