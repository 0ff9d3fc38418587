"""Sharded, replicated collections served from a Ray cluster (see docs/scaling.md).

Each shard is an ordinary nestvec collection held by a Ray actor on its node's disk; the front
door (DistributedCollection) routes writes by a stable hash of the id, replicates them through a
per-shard operation log, and fans searches out to one replica of every shard."""
