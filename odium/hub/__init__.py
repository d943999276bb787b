"""The hub side: dispatch of what nodes and admins send, the key table, the node registry,
broadcasts, bundles, the job queue, and the store (all SQL lives in odium/hub/store.py)."""
