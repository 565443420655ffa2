"""YAML -> validated SearchSpec, and the conditional per-method hyperparameter space (pure; imports data/ only)."""
