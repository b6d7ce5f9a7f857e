"""Logs a sweep to MLflow: each configuration is one run of one experiment in the local file store
mlruns/ (git-ignored), its settings as params and its numbers as metrics. MLflow is imported
only here, and only when the sweep is asked to log."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ("run_id", "label", "mar", "batch_size", "max_batch_delay_ms", "users", "max_requests",
          "max_new_tokens", "stream", "seed", "instance", "usd_per_hour")


def open_store(store: Path, experiment: str):
    """mlflow, pointed at the file store `store` and its experiment `experiment`."""
    # MLflow 3 refuses the file store unless asked (it prefers a database, which mlflow-skinny lacks)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(store.resolve().as_uri())
    mlflow.set_experiment(experiment)
    return mlflow


def log_to_mlflow(rows: list[dict], run_dir: Path, experiment: str, store: Path = ROOT / "mlruns") -> str:
    """Returns the tracking URI written to."""
    mlflow = open_store(store, experiment)
    for row in rows:
        with mlflow.start_run(run_name=row["config"]):
            mlflow.log_params({k: row[k] for k in PARAMS if k in row})
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if k not in PARAMS and isinstance(v, (int, float)) and not isinstance(v, bool)})
            if row["errors"]:
                mlflow.set_tag("errors", row["errors"])
            mlflow.log_artifact(str(run_dir / "results.csv"))
    return mlflow.get_tracking_uri()
