"""`python -m mm_lightning table`: the ablation table (the paper's Table 3) from MLflow.

It reads only the MLflow store: the FINISHED mm.role=train runs of one ablation matrix.
It prints or writes the table, and logs every format plus a bar chart to a summary run
(mm.role=summary) in the same experiment.
"""

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mlflow-experiment", default="ablation", help="MLflow experiment holding the matrix")
    parser.add_argument("--format", choices=["md", "latex", "csv"], default="md")
    parser.add_argument("--out", type=Path, help="write the table here instead of stdout")
    parser.add_argument(
        "--metrics",
        help="comma-separated metric names to show, e.g. id_similarity,dynamic_degree; "
        "a leading + adds them to the default columns (the paper's Table 3 columns and id_reliance)",
    )
    parser.add_argument("--paper", action="store_true", help="show the paper's Table 3 numbers beside ours")
    parser.add_argument("--matrix-id", help="the matrix to show (default: the one whose run started last)")
    parser.add_argument(
        "--matrix",
        metavar="NAME|PATH",
        help="an ablation matrix file (e.g. table3, see experiments/ablations/): its rows in its order, with the "
        "paper's labels and numbers beside ours (implies --paper); default run set: its latest `ablate --matrix` run",
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here: the CLI builds every command's parser, and these imports take seconds.
    from mlflow import MlflowClient

    from mm_lightning.ablation_matrix import load_matrix
    from mm_lightning.config import ConfigError
    from mm_lightning.reports import ablation_table
    from mm_lightning.tracking import tracking_uri

    matrix = None
    if args.matrix:
        try:
            matrix = load_matrix(args.matrix)
        except ConfigError as err:
            print(f"table: {err}", file=sys.stderr)
            return 2
    client = MlflowClient(args.tracking_uri or tracking_uri())
    try:
        experiment_id, runs = ablation_table.fetch_train_runs(client, args.mlflow_experiment)
        matrix_id, runs = ablation_table.select_matrix(runs, args.matrix_id, matrix.name if matrix else None)
    except LookupError as err:
        print(f"table: {err}", file=sys.stderr)
        return 1
    if matrix is None:
        metrics = ablation_table.choose_metrics(args.metrics)
        paper = ablation_table.load_paper_results()["table3"]
        table = ablation_table.aggregate(args.mlflow_experiment, matrix_id, runs, metrics, paper)
    else:
        metrics = ablation_table.choose_metrics(args.metrics or ",".join(matrix.metrics) or None)
        paper = {row.key: row.paper for row in matrix.rows}
        order = [row.key for row in matrix.rows]
        labels = {row.key: row.label for row in matrix.rows}
        table = ablation_table.aggregate(args.mlflow_experiment, matrix_id, runs, metrics, paper, order, labels)
        args.paper = True
    text = ablation_table.render(table, args.format, args.paper)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    run_id = ablation_table.log_summary(client, experiment_id, table, args.paper)
    print(f"table: logged to MLflow run {run_id} (experiment {args.mlflow_experiment})", file=sys.stderr)
    return 0
