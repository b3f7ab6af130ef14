"""prepare_report.json, its PNG plots, and the MLflow run that holds both."""

import json
from collections import Counter
from pathlib import Path

import numpy as np

REPORT = "prepare_report.json"
PLOTS = ("face_sizes.png", "identity_sizes.png", "pair_cosines.png", "drop_reasons.png")


def write_plots(
    out: Path, face_sizes: list[float], identity_sizes: list[int], cosines: list[float], drops: dict[str, int]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    paths = []
    panels = [
        (face_sizes, "face size (px, shorter box side)", "items"),
        (identity_sizes, "items per identity", "identities"),
        (cosines, "cos(target, reference)", "references"),
    ]
    for name, (values, xlabel, ylabel) in zip(PLOTS[:3], panels, strict=True):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(values, bins=20) if len(values) else ax.text(0.5, 0.5, "none", ha="center")
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
        paths.append(_save(fig, out / name))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.barh(list(drops), list(drops.values())) if drops else ax.text(0.5, 0.5, "nothing dropped", ha="center")
    ax.set_xlabel("dropped")
    paths.append(_save(fig, out / PLOTS[3]))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarise(drops: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(d["reason"] for d in drops).items(), key=lambda kv: -kv[1]))


def write_report(out: Path, report: dict) -> Path:
    path = out / REPORT
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def log_to_mlflow(cfg, report: dict, files: list[Path]) -> str:
    """One run in the MLflow experiment "prepare": counts as metrics, report and plots as artifacts."""
    from mlflow.tracking import MlflowClient

    from mm_lightning.tracking import MLFLOW_RUN_NAME, ensure_experiment, tracking_uri

    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    run = client.create_run(
        ensure_experiment(client, "prepare", uri), tags={MLFLOW_RUN_NAME: f"prepare-{Path(report['out']).name}"}
    )
    run_id = run.info.run_id
    client.log_param(run_id, "input", report["input"])
    client.log_param(run_id, "out", report["out"])
    flat = {
        "rows/image": report["rows"]["image"],
        "rows/video": report["rows"]["video"],
        "identities": report["identities"]["count"],
        "seconds": report["seconds"],
        **{f"dropped/{k}": v for k, v in report["dropped"].items()},
    }
    for key, value in flat.items():
        client.log_metric(run_id, key, float(value))
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def histogram(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
