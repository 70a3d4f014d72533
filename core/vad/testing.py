"""pytest plugin for vad and its plugin authors (placeholder being written)."""
