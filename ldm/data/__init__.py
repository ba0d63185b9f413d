"""Pictures and captions to batches: decoding, sources and the audit, transforms, buckets, the replayable stream,
shards, the encoded cache, the built-in emoji world."""
