"""The torch core of Kiln: models, losses, metrics, artifacts and the per-worker loop.

Nothing here looks up Ray actors; the Train loop is handed shard handles by its caller.
"""
