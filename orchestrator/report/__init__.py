"""MLflow tracking, search summaries, the Pareto front and plots (imports spec/, evaluation/)."""
