"""A whole search: the Tuner (Optuna, ASHA), the base reference, the search flow (imports every folder but the commands)."""
