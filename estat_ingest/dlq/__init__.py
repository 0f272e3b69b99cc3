"""The on-disk dead-letter queue: store (atomic files) and replayer (background loop)."""
