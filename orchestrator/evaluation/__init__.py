"""Scoring, per-task accuracy, seesaw and per-evaluation metrics (imports data/, models/)."""
