"""Per-method table of the `score` command: mean ± std over videos, in markdown, CSV or LaTeX."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The paper's Table 1 order, then our face-normalised FM. A column appears only when some video has it
# (text alignment and inception score need local weights).
METRICS = (
    "dynamic_degree",
    "text_alignment",
    "inception_score",
    "motion_smoothness",
    "id_similarity",
    "similarity_decay",
    "fm_ref",
    "fm_inter",
    "fm_ref_face",
    "fm_inter_face",
)


@dataclass
class Cell:
    values: list[float]  # the defined (non-NaN) per-video values
    undefined: int = 0  # scored videos without a value (e.g. id_similarity of a video with no face)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over videos; NaN below two videos."""
        return statistics.stdev(self.values) if self.n >= 2 else math.nan


@dataclass
class MethodRow:
    method: str
    videos: int  # rows of the manifest for this method
    errors: int  # of those, videos that could not be scored
    no_face_frames: int
    frames_scored: int
    cells: dict[str, Cell]

    @property
    def face_rate(self) -> float:
        """Fraction of the scored frames of this method's videos with a detected face."""
        return 1 - self.no_face_frames / self.frames_scored if self.frames_scored else math.nan


def build_table(records: Sequence[dict]) -> tuple[list[str], list[MethodRow]]:
    """(metric columns, one row per method in first-seen order) from per_video.jsonl records."""
    columns = [m for m in METRICS if any(m in r for r in records)]
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        scored = [r for r in mine if "error" not in r]

        def cell(name: str, scored: list[dict] = scored) -> Cell:
            values = [float(r[name]) for r in scored if r.get(name) is not None and not math.isnan(r[name])]
            return Cell(values, len(scored) - len(values))

        rows.append(
            MethodRow(
                method,
                len(mine),
                len(mine) - len(scored),
                sum(r["no_face_frames"] for r in scored),
                sum(r["frames_scored"] for r in scored),
                {m: cell(m) for m in columns},
            )
        )
    return columns, rows


def _cell_text(cell: Cell, pm: str) -> str:
    count = f"{cell.n} of {cell.n + cell.undefined}" if cell.undefined else f"{cell.n}"
    if cell.n == 0:
        return f"— ({count})"
    spread = "" if math.isnan(cell.std) else f" {pm} {cell.std:.3f}"
    return f"{cell.mean:.3f}{spread} ({count})"


def render(columns: list[str], rows: list[MethodRow], fmt: str) -> str:
    """Cells read `mean ± std (n)`, n the videos with a defined value; `(n of m)` when m - n scored videos have
    none (id_similarity of a video without any face, FM with too few faces), and `— (0 of m)` when no video has."""
    header = ["method", "videos", "errors", "no-face frames", "face rate", *columns]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header[:5] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n", "undefined")])
        for r in rows:
            writer.writerow(
                [
                    r.method,
                    r.videos,
                    r.errors,
                    f"{r.no_face_frames}/{r.frames_scored}",
                    r.face_rate,
                    *[
                        x
                        for c in columns
                        for x in (r.cells[c].mean, r.cells[c].std, r.cells[c].n, r.cells[c].undefined)
                    ],
                ]
            )
        return out.getvalue()
    pm = r"$\pm$" if fmt == "latex" else "±"
    lines = [
        [
            r.method,
            str(r.videos),
            str(r.errors),
            f"{r.no_face_frames}/{r.frames_scored}",
            "—" if math.isnan(r.face_rate) else f"{r.face_rate:.3f}",
            *[_cell_text(r.cells[c], pm) for c in columns],
        ]
        for r in rows
    ]
    if fmt == "md":
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]) + "\n"
    if fmt == "latex":
        escape = lambda s: s.replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")  # noqa: E731
        body = [" & ".join(map(escape, header)) + r" \\", r"\midrule"]
        body += [" & ".join([escape(cells[0]), *cells[1:]]) + r" \\" for cells in lines]
        return (
            "\n".join(
                [
                    r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
                    r"\toprule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                ]
            )
            + "\n"
        )
    raise ValueError(f"unknown format {fmt!r}; use md, csv or latex")
