"""High-level APIs: inference with a config and checkpoint, and checkpoint conversion."""
