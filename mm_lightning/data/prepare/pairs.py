"""Target/reference pairs inside each identity, with the paper's cosine rule.

MagicMirror keeps image pairs whose face embeddings agree (cos > 0.65); video clips take a
reference from a keyframe or from other footage of the same person. Here:
- an image row takes up to `max_references` *other* images of its identity;
- a video row takes up to `max_references` images or keyframes of clips from *other* videos
  of its identity (cross-video pairs), else its own keyframe (`reference_rule: keyframe`);
and every reference must satisfy min_cosine < cos(target, reference) < max_cosine, the upper
bound dropping near-duplicates. The most similar references inside the bounds are taken.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Pairing:
    references: list[int]  # item indices; empty with keyframe=True
    cosines: list[float]  # cos(target, reference) per reference
    keyframe: bool = False  # video row whose reference is its own keyframe


def _reference_image(item: dict) -> str:
    return item["media"] if item["kind"] == "image" else item["keyframe_image"]


def pair_items(
    items: list[dict],
    identities: list[str | None],
    embeddings: np.ndarray,
    min_cosine: float,
    max_cosine: float,
    max_references: int,
) -> list[Pairing | None]:
    """A Pairing per item (None: no reference passes the rule)."""
    similarity = embeddings @ embeddings.T  # [N, N] cosine, embeddings are L2-normalised
    by_identity: dict[str, list[int]] = {}
    for i, name in enumerate(identities):
        if name is not None:
            by_identity.setdefault(name, []).append(i)
    out: list[Pairing | None] = []
    for i, item in enumerate(items):
        if identities[i] is None:
            out.append(None)
            continue
        candidates = [
            j
            for j in by_identity[identities[i]]
            if j != i
            and item["source"] != items[j]["source"]
            and (item["kind"] == "video" or items[j]["kind"] == "image")
        ]
        good = sorted(
            (j for j in candidates if min_cosine < similarity[i, j] < max_cosine), key=lambda j: -similarity[i, j]
        )[:max_references]
        if good:
            out.append(Pairing(good, [float(similarity[i, j]) for j in good]))
        elif item["kind"] == "video":
            # The keyframe face is one of the faces the clip embedding averages: it passes the lower
            # bound by construction; the upper bound does not apply to a clip and its own frame.
            out.append(
                Pairing([], [float(item["keyframe_cosine"])], keyframe=True)
                if item["keyframe_cosine"] > min_cosine
                else None
            )
        else:
            out.append(None)
    return out


def reference_paths(items: list[dict], pairing: Pairing) -> list[str]:
    return [_reference_image(items[j]) for j in pairing.references]
