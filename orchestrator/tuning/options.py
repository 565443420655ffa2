"""Command-line flags shared by ``orchestrator.search`` and ``orchestrator.study``, and what they override."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """--space, --dry-run, --smoke-test, --resume and the cluster/tracking/storage/data overrides."""
    p.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved plan; start nothing")
    p.add_argument("--smoke-test", action="store_true", help="shrink steps, eval items and trials (CPU, minutes)")
    p.add_argument("--resume", action="store_true", help="continue <storage_path>/<name> if it holds a search")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else SQLite)")
    p.add_argument("--storage-path", default=None, help="override storage_path of the YAML")
    p.add_argument("--num-trials", type=int, default=None, help="override search.num_trials")
    p.add_argument("--experiment", default=None, help="override tracking.experiment (MLflow experiment name)")
    p.add_argument("--name", default=None, help="override name (the search folder under the storage path)")
    p.add_argument("--data-dir", default=None, help="override data.data_dir; 'hub' loads the tasks from the "
                   "Hugging Face Hub")


def cli_overrides(args: argparse.Namespace) -> dict:
    """Command-line values as search-space overrides (validated with the file, after --smoke-test)."""
    out: dict = {}
    if args.num_trials is not None:
        out["search"] = {"num_trials": args.num_trials}
    if args.experiment:
        out["tracking"] = {"experiment": args.experiment}
    if args.data_dir:
        out["data"] = {"data_dir": None if args.data_dir == "hub" else str(Path(args.data_dir).expanduser().resolve())}
    if args.name:
        out["name"] = args.name
    if args.storage_path:
        out["storage_path"] = args.storage_path
    return out
