"""Ablation matrices as data: experiments/ablations/<name>.yaml, or any YAML on disk.

A matrix file names a base experiment, a training budget (the fraction of each stage's
iterations every row trains for) and its rows; each row has a key, the paper's label,
the five flags of the paper's Table 3 and the paper's numbers. `load_matrix` turns each
row into `key=value` config overrides, enough on their own to train the row:

    python -m mm_lightning fit --experiment <matrix.experiment> <row.overrides...>

The budget overrides (`curriculum.stages.<stage>.max_steps`) are computed from the config
the row resolves to, so they depend on the profile and on any overrides given for the
whole matrix; pass those to `load_matrix` and put them *before* the row's overrides when
training (the row's flags win over the matrix-wide overrides).

Runs of a row are meant to carry `row.tags` (mm.variant = the row key, so the table's
"full" baseline and delta columns work, plus the matrix name, the row label and the
budget); `table --matrix NAME` lists the rows in the file's order with the paper's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mm_lightning.config import EXPERIMENTS_DIR, ConfigError, load_config
from mm_lightning.tracking import TAG_BUDGET, TAG_BUDGET_FRACTION, TAG_MATRIX, TAG_ROW_LABEL, TAG_VARIANT

MATRICES_DIR = EXPERIMENTS_DIR / "ablations"
FLAGS = ("x_id", "x_face", "m_face", "can", "pretrain")  # the columns of the paper's Table 3


@dataclass
class _RowSchema:
    key: str = "???"
    label: str = "???"
    flags: dict[str, bool] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)


@dataclass
class _MatrixSchema:
    name: str = "???"
    experiment: str = "full"  # the experiment every row composes over
    budget_fraction: float = 1.0  # share of each stage's max_steps every row trains for
    metrics: list[str] = field(default_factory=list)  # the paper's columns, in its order
    rows: list[_RowSchema] = field(default_factory=list)


@dataclass(frozen=True)
class MatrixRow:
    key: str  # "A" ... "G", "full": the run's mm.variant
    label: str  # the paper's row label
    flags: dict[str, bool]  # x_id, x_face, m_face, can, pretrain
    overrides: list[str]  # key=value: model flags, curriculum.order, budgeted max_steps
    experiment: str  # the experiment YAML the overrides compose over
    paper: dict[str, float]  # the paper's numbers for this row, by metric name
    budget: dict[str, int]  # stage -> max_steps this row trains for
    tags: dict[str, str]  # MLflow tags for the row's runs


@dataclass(frozen=True)
class AblationMatrix:
    name: str
    experiment: str
    budget_fraction: float
    metrics: list[str]
    rows: list[MatrixRow]
    path: Path

    def row(self, key: str) -> MatrixRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise ConfigError(f"matrix {self.name!r} has no row {key!r}; rows: {', '.join(r.key for r in self.rows)}")


def list_matrices() -> list[str]:
    return sorted(p.stem for p in MATRICES_DIR.glob("*.yaml"))


def matrix_path(name_or_path: str) -> Path:
    """A matrix name (experiments/ablations/<name>.yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"no ablation matrix file at {path}")
        return path
    if name_or_path not in list_matrices():
        raise ConfigError(
            f"unknown ablation matrix {name_or_path!r}; available: {', '.join(list_matrices()) or 'none'} "
            f"(in {MATRICES_DIR}), or give a path to a matrix YAML"
        )
    return MATRICES_DIR / f"{name_or_path}.yaml"


def load_matrix(
    name_or_path: str, profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()
) -> AblationMatrix:
    """Reads and checks a matrix; every row is resolved against `profile` and the matrix-wide
    `overrides` (so a row whose flags cannot build is an error here, not hours into a run)."""
    path = matrix_path(name_or_path)
    try:
        spec = OmegaConf.merge(OmegaConf.structured(_MatrixSchema), OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err.msg if hasattr(err, 'msg') else err}") from None
    if not 0.0 < spec.budget_fraction <= 1.0:
        raise ConfigError(f"{path}: budget_fraction must be in (0, 1], got {spec.budget_fraction}")
    if not spec.rows:
        raise ConfigError(f"{path}: the matrix has no rows")
    keys = [row.key for row in spec.rows]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{path}: row keys must be unique, got {keys}")
    rows = [_resolve_row(path, spec, row, profile, list(overrides)) for row in spec.rows]
    return AblationMatrix(spec.name, spec.experiment, spec.budget_fraction, list(spec.metrics), rows, path)


def flag_overrides(flags: dict[str, bool], base_order: list[str], stage_data: dict[str, str]) -> list[str]:
    """The model and curriculum overrides of one row's five flags."""
    branches = [name for name, on in (("identity", flags["x_id"]), ("structural", flags["x_face"])) if on]
    # Without the pretrain tick a row skips every image stage of the base curriculum.
    order = [s for s in base_order if flags["pretrain"] or stage_data[s] != "image"]
    return [
        f"model.branches=[{','.join(branches)}]",
        f"model.face_modality={str(flags['m_face']).lower()}",
        f"model.can={str(flags['can']).lower()}",
        f"curriculum.order=[{','.join(order)}]",
    ]


def _resolve_row(path: Path, spec, row, profile: str, overrides: list[str]) -> MatrixRow:
    where = f"{path}, row {row.key}"
    if set(row.flags) != set(FLAGS):
        raise ConfigError(f"{where}: flags must be exactly {', '.join(FLAGS)}, got {', '.join(row.flags)}")
    flags = {name: bool(row.flags[name]) for name in FLAGS}
    if not (flags["x_id"] or flags["x_face"]):
        raise ConfigError(f"{where}: a row needs at least one face branch (x_id or x_face)")
    base = load_config(spec.experiment, profile, overrides)
    stage_data = {name: stage.data for name, stage in base.curriculum.stages.items()}
    row_overrides = flag_overrides(flags, list(base.curriculum.order), stage_data)
    if row_overrides[-1] == "curriculum.order=[]":
        raise ConfigError(f"{where}: without pretrain no stage of {list(base.curriculum.order)} is left")
    try:
        cfg = load_config(spec.experiment, profile, [*overrides, *row_overrides])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    budget = {
        stage: max(1, round(cfg.curriculum.stages[stage].max_steps * spec.budget_fraction))
        for stage in cfg.curriculum.order
    }
    row_overrides += [f"curriculum.stages.{stage}.max_steps={steps}" for stage, steps in budget.items()]
    tags = {
        TAG_VARIANT: row.key,
        TAG_MATRIX: spec.name,
        TAG_ROW_LABEL: row.label,
        TAG_BUDGET_FRACTION: str(spec.budget_fraction),
        TAG_BUDGET: ",".join(f"{stage}={steps}" for stage, steps in budget.items()),
    }
    return MatrixRow(
        key=row.key,
        label=row.label,
        flags=flags,
        overrides=row_overrides,
        experiment=spec.experiment,
        paper=dict(row.paper),
        budget=budget,
        tags=tags,
    )
