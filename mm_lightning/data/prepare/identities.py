"""Identity grouping over every kept image and clip: agglomerative clustering on cosine.

Folder labels constrain it. Items under one label are one identity. Unlabelled items are
clustered (average linkage, cut where members agree above `min_cosine`) together with
one centroid per label; a cluster holding one label joins that label, a cluster holding
several is split by nearest label centroid, a cluster with none is a new identity. A
labelled item that disagrees with its folder's medoid (another person in that folder) is
dropped as "label_mismatch".
"""

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

# MagicMirror's paper does not say how identities were grouped; the defaults are ours.
DEFAULT_MIN_COSINE = {"dlib": 0.92, "insightface": 0.4}


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def group_identities(embeddings: np.ndarray, labels: list[str | None], min_cosine: float) -> list[str | None]:
    """Identity name per item ([N, D] L2-normalised embeddings); None for a dropped label mismatch."""
    out: list[str | None] = list(labels)
    names = sorted({label for label in labels if label is not None})
    centroids = {}
    for name in names:
        members = [i for i, label in enumerate(labels) if label == name]
        # The medoid (most similar to the others) stands for the folder: a mean would be pulled by intruders.
        similarity = embeddings[members] @ embeddings[members].T
        medoid = embeddings[members[int(similarity.sum(1).argmax())]]
        for i in members:
            if float(embeddings[i] @ medoid) < min_cosine:
                out[i] = None
        kept = [i for i in members if out[i] is not None]
        if kept:
            centroids[name] = _normalise(embeddings[kept].mean(0))
    free = [i for i, label in enumerate(labels) if label is None]
    if not free:
        return out
    points = np.concatenate([np.stack(list(centroids.values())), embeddings[free]]) if centroids else embeddings[free]
    if len(points) == 1:
        clusters = np.array([1])
    else:
        tree = linkage(points, method="average", metric="cosine")
        clusters = fcluster(tree, t=1.0 - min_cosine, criterion="distance")  # cosine distance = 1 - cos
    label_names = list(centroids)
    label_cluster = {name: clusters[k] for k, name in enumerate(label_names)}
    new_names: dict[int, str] = {}
    for k, i in enumerate(free):
        cluster = clusters[len(label_names) + k]
        inside = [name for name in label_names if label_cluster[name] == cluster]
        if len(inside) == 1:
            out[i] = inside[0]
        elif inside:
            out[i] = max(inside, key=lambda name: float(embeddings[i] @ centroids[name]))
        else:
            out[i] = new_names.setdefault(cluster, f"id_{len(new_names):04d}")
    return out
