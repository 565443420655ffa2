"""Ray/Optuna/MLflow orchestration, data suites and evaluation for malora adapters."""
