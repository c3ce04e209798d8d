"""Long-lived Ray actors: ShardStore (dataset shards), Registry (catalog owner), ModelReplica."""
