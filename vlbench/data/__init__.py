"""Data: the synthetic world, image loading, tokenizers (and later the region-feature store)."""
