"""Per-video review plots logged with the evaluation: a contact sheet and the per-frame ID similarity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def contact_sheet(path: Path, reference: np.ndarray, frames: np.ndarray, title: str, columns: int = 6) -> None:
    """The reference photo followed by uniformly sampled frames, in one row."""
    picks = np.linspace(0, len(frames) - 1, columns).round().astype(int)
    fig, axes = plt.subplots(1, columns + 1, figsize=(2 * (columns + 1), 2.3))
    axes[0].imshow(reference)
    axes[0].set_title("reference", fontsize=8)
    for ax, i in zip(axes[1:], picks):
        ax.imshow(frames[i])
        ax.set_title(f"frame {i}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def similarity_plot(path: Path, similarities: list, title: str) -> None:
    """ID similarity per sampled frame; frames without a detected face are marked with x at 0."""
    fig, ax = plt.subplots(figsize=(5, 2.5))
    xs = range(len(similarities))
    ax.plot(
        [x for x in xs if similarities[x] is not None],
        [s for s in similarities if s is not None],
        "o-",
        label="face found",
    )
    missing = [x for x in xs if similarities[x] is None]
    if missing:
        ax.plot(missing, [0] * len(missing), "rx", label="no face")
    ax.set(xlabel="sampled frame", ylabel="ID similarity", ylim=(-0.05, 1.05), title=title[:60])
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
