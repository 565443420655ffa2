"""Causal LMs by name: the offline SmolLM2-135M, a config-built tiny LLaMA, or any Hub id (imports data/ only)."""
