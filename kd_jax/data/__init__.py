"""Data path: reasoning traces -> tokens (traces.py) -> KD store (store.py) -> packed batches."""
