"""The ablation table (the paper's Table 3), built only from the runs of one MLflow experiment.

The steps: fetch_train_runs -> select_matrix -> aggregate -> render / render_chart, and
log_summary stores every format and the chart in a summary run. A training run counts
when it is FINISHED and tagged mm.role=train. It also carries the tags mm.variant,
mm.seed, mm.matrix_id and mm.final_stage, and it logs its evaluation metrics as
eval/<stage>/<metric>.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from mlflow import MlflowClient

from mm_lightning.tracking import TAG_FINAL_STAGE, TAG_MATRIX, TAG_MATRIX_ID, TAG_ROLE, TAG_SEED, TAG_VARIANT

TABLE3_METRICS = ("text_alignment", "fm_inter", "id_similarity")  # the columns of the paper's Table 3
# Table 3's columns, then the face-normalised facial motion (motion apart from framing), the share of sampled
# frames with a detected face (what id_similarity is averaged over), and the identity-reliance probe
# (mm_lightning/reliance.py), which moves even where the sampled metrics can't (tiny models' videos hold no face).
DEFAULT_METRICS = (*TABLE3_METRICS, "fm_inter_face", "face_rate", "id_reliance")
BASELINE = "full"
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}  # format -> artifact file extension
DIGITS = {"id_reliance": 4}  # decimals where 3 are too few (the tiny profile's probe reads a few thousandths); else 3
PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
PAPER_MISSING = "not reported in the paper's Table 3"


def choose_metrics(spec: str | None) -> tuple[str, ...]:
    """`a,b` shows exactly a and b; `+a,b` adds them to the Table 3 columns."""
    if not spec:
        return DEFAULT_METRICS
    names = [name for name in spec.lstrip("+").split(",") if name]
    if spec.startswith("+"):
        names = [*DEFAULT_METRICS, *names]
    return tuple(dict.fromkeys(names))


def load_paper_results() -> dict:
    return yaml.safe_load(PAPER_RESULTS.read_text())


@dataclass(frozen=True)
class TrainRun:
    variant: str
    seed: str
    matrix_id: str
    status: str
    start_time: int
    metrics: dict[str, float]  # the final stage's eval metrics, by bare name
    matrix: str | None = None  # mm.matrix: the matrix file's name (ablate --matrix), None for ad-hoc variants


def fetch_train_runs(client: MlflowClient, experiment_name: str) -> tuple[str, list[TrainRun]]:
    """The experiment id and its mm.role=train runs of every status, oldest first."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment named {experiment_name!r} at {client.tracking_uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], "tags.`mm.role` = 'train'", page_token=token)
        runs += [run for run in map(_train_run, page) if run is not None]
        token = page.token
        if not token:
            return experiment.experiment_id, sorted(runs, key=lambda run: run.start_time)


def _train_run(run) -> TrainRun | None:
    tags = run.data.tags
    if not all(key in tags for key in (TAG_VARIANT, TAG_SEED, TAG_MATRIX_ID)):
        return None  # a training run outside any ablation matrix
    # Only the last stage's evaluation describes the trained model.
    stage = tags.get(TAG_FINAL_STAGE)
    prefix = f"eval/{stage}/"
    metrics = {key[len(prefix) :]: value for key, value in run.data.metrics.items() if stage and key.startswith(prefix)}
    return TrainRun(
        variant=tags[TAG_VARIANT],
        seed=tags[TAG_SEED],
        matrix_id=tags[TAG_MATRIX_ID],
        status=run.info.status,
        start_time=run.info.start_time,
        metrics=metrics,
        matrix=tags.get(TAG_MATRIX),
    )


def select_matrix(
    runs: list[TrainRun], matrix_id: str | None = None, matrix_name: str | None = None
) -> tuple[str, list[TrainRun]]:
    """The runs of `matrix_id`, or of the matrix whose run started last (of matrix file
    `matrix_name` when given)."""
    if not runs:
        raise LookupError("no training runs (tagged mm.role=train and mm.matrix_id) in this experiment")
    if matrix_id is None and matrix_name is not None:
        named = [run for run in runs if run.matrix == matrix_name]
        if not named:
            raise LookupError(f"no training runs of ablation matrix {matrix_name!r} (tag mm.matrix) in this experiment")
        matrix_id = max(named, key=lambda run: run.start_time).matrix_id
    if matrix_id is None:
        matrix_id = max(runs, key=lambda run: run.start_time).matrix_id
    chosen = [run for run in runs if run.matrix_id == matrix_id]
    if not chosen:
        known = ", ".join(sorted({run.matrix_id for run in runs}))
        raise LookupError(f"no training runs of matrix {matrix_id!r}; this experiment has: {known}")
    return matrix_id, chosen


@dataclass(frozen=True)
class Cell:
    """One variant's metric: the finite values over its seeds, and why other seeds gave none."""

    values: tuple[float, ...]
    notes: tuple[str, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        # The sample std (ddof=1), which one seed leaves undefined.
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass(frozen=True)
class AblationTable:
    experiment: str
    matrix_id: str
    metrics: tuple[str, ...]
    variants: tuple[str, ...]  # full first, then the paper's row order, then the rest by name
    cells: dict[tuple[str, str], Cell]  # (variant, metric) -> cell
    paper: dict[str, dict[str, float]]  # the paper's Table 3: variant -> metric -> value
    labels: dict[str, str] = field(default_factory=dict)  # variant -> shown name (a matrix row's paper label)

    def label(self, variant: str) -> str:
        return self.labels.get(variant, variant)

    def delta(self, variant: str, metric: str) -> float | None:
        """The difference of means against full, None where either mean is missing."""
        mine, base = self.cells[variant, metric].mean, self.cells[BASELINE, metric].mean
        return None if mine is None or base is None else mine - base


def aggregate(
    experiment: str,
    matrix_id: str,
    runs: list[TrainRun],
    metrics: tuple[str, ...],
    paper: dict[str, dict[str, float]],
    order: list[str] | None = None,
    labels: dict[str, str] | None = None,
) -> AblationTable:
    """One matrix's runs (oldest first) as the ablation table; `paper` is Table 3 of the yaml.

    `order` (a matrix file's row keys) lists those rows first, in that order, each one
    shown even without runs; `labels` names them (the paper's row labels)."""
    finished: dict[tuple[str, str], TrainRun] = {}
    for run in runs:
        if run.status == "FINISHED":
            finished[run.variant, run.seed] = run  # a later rerun of a seed replaces the earlier
    fixed = order is not None
    order = list(order) if fixed else [BASELINE, *paper]
    variants = sorted(
        {BASELINE, *(run.variant for run in runs), *(order if fixed else ())},
        key=lambda v: (order.index(v) if v in order else len(order), v),
    )
    # Every seed of the matrix is expected of every variant, so a seed that some variant
    # lacks is reported, not silently left out of its mean.
    all_seeds = list(dict.fromkeys(run.seed for run in runs))
    cells = {}
    for variant in variants:
        seeds = [finished[variant, seed] for seed in all_seeds if (variant, seed) in finished]
        missing = [seed for seed in all_seeds if (variant, seed) not in finished]
        unfinished = Counter(run.status for run in runs if run.variant == variant and run.status != "FINISHED")
        for metric in metrics:
            cells[variant, metric] = _cell(variant, metric, seeds, missing, unfinished)
    return AblationTable(experiment, matrix_id, tuple(metrics), tuple(variants), cells, paper, dict(labels or {}))


def _cell(variant: str, metric: str, seeds: list[TrainRun], missing: list[str], unfinished: Counter) -> Cell:
    values, not_logged, undefined = [], [], []
    for run in seeds:
        value = run.metrics.get(metric)
        if value is None:
            not_logged.append(run.seed)
        elif math.isnan(value):
            undefined.append(run.seed)
        else:
            values.append(value)
    notes = []
    if missing:
        statuses = "".join(f"; {count} {status}" for status, count in sorted(unfinished.items()))
        notes.append(f"{variant}: no finished training run ({_seeds(missing)}{statuses})")
    if not_logged:
        notes.append(f"{variant}: {metric} not logged at the final stage ({_seeds(not_logged)})")
    if undefined:
        notes.append(f"{variant}: {metric} undefined, NaN, e.g. no face detected ({_seeds(undefined)})")
    return Cell(tuple(values), tuple(notes))


def _seeds(seeds: list[str]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(seeds)


class _Footnotes:
    """Numbers each distinct note in the order the table first shows it."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, notes) -> list[str]:
        return [str(self.numbers.setdefault(note, len(self.numbers) + 1)) for note in notes]


@dataclass(frozen=True)
class _Style:
    dash: str
    pm: str
    delta: str
    escape: Callable[[str], str]
    mark: Callable[[list[str]], str]


_MD = _Style(
    dash="—",
    pm="±",
    delta="Δ full",
    escape=lambda text: text.replace("|", r"\|"),
    mark=lambda numbers: f" [{','.join(numbers)}]" if numbers else "",
)
_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}
_LATEX = _Style(
    dash="---",
    pm=r"$\pm$",
    delta=r"$\Delta$ full",
    escape=lambda text: "".join(_TEX_SPECIAL.get(c, c) for c in text),
    mark=lambda numbers: rf"\textsuperscript{{{','.join(numbers)}}}" if numbers else "",
)


def _caption(table: AblationTable) -> str:
    return (
        f"Ablation, MLflow experiment {table.experiment}, matrix {table.matrix_id}: "
        "mean ± sample std over seeds (n seeds); Δ full = difference of means against full "
        "(— where either mean is missing)."
    )


def _grid(table: AblationTable, style: _Style, with_paper: bool):
    """Header, rows and numbered footnotes, as strings in `style`."""
    notes = _Footnotes()
    header = ["variant"]
    for metric in table.metrics:
        header += [style.escape(metric), style.delta] + (["paper"] if with_paper else [])
    rows = []
    for variant in table.variants:
        row = [style.escape(table.label(variant))]
        for metric in table.metrics:
            cell = table.cells[variant, metric]
            digits = DIGITS.get(metric, 3)
            row.append(_format_cell(cell, style, digits) + style.mark(notes.mark(cell.notes)))
            delta = table.delta(variant, metric)
            row.append(style.dash if delta is None else f"{delta:+.{digits}f}")
            if with_paper:
                value = table.paper.get(variant, {}).get(metric)
                row.append(style.dash + style.mark(notes.mark([PAPER_MISSING])) if value is None else f"{value:.3f}")
        rows.append(row)
    footnotes = [(number, style.escape(note)) for note, number in notes.numbers.items()]
    return header, rows, footnotes


def _format_cell(cell: Cell, style: _Style, digits: int) -> str:
    if cell.mean is None:
        return style.dash
    spread = "" if cell.std is None else f" {style.pm} {cell.std:.{digits}f}"
    return f"{cell.mean:.{digits}f}{spread} (n={cell.n})"


def _render_md(table: AblationTable, with_paper: bool) -> str:
    header, rows, footnotes = _grid(table, _MD, with_paper)
    lines = [_caption(table), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if footnotes:
        lines += [""] + [f"[{number}] {note}  " for number, note in footnotes]
    return "\n".join(lines) + "\n"


def _render_latex(table: AblationTable, with_paper: bool) -> str:
    header, rows, footnotes = _grid(table, _LATEX, with_paper)
    lines = [
        "% " + _caption(table),
        "% needs \\usepackage{booktabs}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
        *(" & ".join(row) + r" \\" for row in rows),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    if footnotes:
        lines += ["", r"{\footnotesize"] + [rf"\textsuperscript{{{n}}} {note}\\" for n, note in footnotes] + ["}"]
    return "\n".join(lines) + "\n"


def _render_csv(table: AblationTable, with_paper: bool) -> str:
    """One row per (variant, metric), full precision; the note column explains every —."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["variant", "metric", "mean", "std", "n", "delta_vs_full"] + (["paper"] if with_paper else []) + ["note"]
    )
    for variant in table.variants:
        for metric in table.metrics:
            cell = table.cells[variant, metric]
            row = [
                variant,
                metric,
                _number(cell.mean),
                _number(cell.std),
                cell.n,
                _number(table.delta(variant, metric)),
            ]
            notes = list(cell.notes)
            if with_paper:
                paper = table.paper.get(variant, {}).get(metric)
                row.append(_number(paper))
                notes += [PAPER_MISSING] if paper is None else []
            writer.writerow(row + ["; ".join(notes)])
    return out.getvalue()


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


_RENDERERS = {"md": _render_md, "latex": _render_latex, "csv": _render_csv}


def render(table: AblationTable, fmt: str, with_paper: bool = False) -> str:
    return _RENDERERS[fmt](table, with_paper)


def render_chart(table: AblationTable, with_paper: bool = False) -> Figure:
    """One bar chart per metric: the mean over seeds, with the std as error bar."""
    # A bare Figure renders PNG through Agg and touches no pyplot or global backend state.
    fig = Figure(figsize=(1 + 0.8 * len(table.variants) * len(table.metrics), 4), layout="constrained")
    x = range(len(table.variants))
    for ax, metric in zip(fig.subplots(1, len(table.metrics), squeeze=False)[0], table.metrics):
        cells = [table.cells[variant, metric] for variant in table.variants]
        means = [math.nan if cell.mean is None else cell.mean for cell in cells]
        ax.bar(x, means, yerr=[cell.std or 0.0 for cell in cells], capsize=4, label="ours")
        for i, cell in enumerate(cells):
            if cell.mean is None:  # tells a missing bar from a zero one; the table's footnotes say why
                ax.text(i, 0, "n/a", ha="center", va="bottom")
        if with_paper:
            paper = [table.paper.get(variant, {}).get(metric, math.nan) for variant in table.variants]
            ax.scatter(x, paper, marker="_", s=400, color="tab:red", zorder=3, label="paper")
        ax.set_title(metric)
        ax.set_xticks(list(x), [table.label(v) for v in table.variants], rotation=30, ha="right")
        ax.set_xlim(-0.5, len(table.variants) - 0.5)  # NaN bars alone would not set it
    fig.axes[0].legend()
    fig.suptitle(f"{table.experiment}, matrix {table.matrix_id}: mean ± std over seeds")
    return fig


def log_summary(client: MlflowClient, experiment_id: str, table: AblationTable, with_paper: bool = False) -> str:
    """Logs every format and the chart as artifacts of a new summary run; returns its id."""
    run_id = client.create_run(
        experiment_id,
        tags={TAG_ROLE: "summary", TAG_MATRIX_ID: table.matrix_id},
        run_name=f"ablation-table-{table.matrix_id}",
    ).info.run_id
    try:
        for fmt, extension in FORMATS.items():
            client.log_text(run_id, render(table, fmt, with_paper), f"ablation_table.{extension}")
        client.log_figure(run_id, render_chart(table, with_paper), "ablation_chart.png")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
