"""torchmetrics sync: states of videos split over instances or processes add up to one instance over all."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mm_lightning.evaluation.dynamic_degree import DynamicDegree
from mm_lightning.evaluation.facial_motion import FacialMotionInter, FacialMotionRef
from mm_lightning.evaluation.id_similarity import IDSimilarity
from mm_lightning.evaluation.similarity_decay import SimilarityDecay

SIZE = (200, 400)
RNG = np.random.default_rng(0)
FACES = [[None if RNG.random() < 0.2 else RNG.uniform(0, 400, (5, 2)) for _ in range(6)] for _ in range(8)]
SIMS = [[None if f is None else float(RNG.uniform(0.5, 1.0)) for f in video] for video in FACES]
REFERENCE = [(RNG.uniform(0, 400, (5, 2)), SIZE)]
SPEEDS = [9.0, 0.0, 7.0, 1.0, 8.0, 0.5, 6.5, 0.0]  # one constant flow per video


class SpeedFlow:
    """Every pixel moves `speed` px: a flow estimator whose answer is known."""

    def __init__(self):
        self.speed = 0.0

    def __call__(self, a, b):
        return np.full((*a.shape[:2], 2), [self.speed, 0.0], np.float32)


def make_metrics():
    return {
        "id": IDSimilarity(),
        "decay": SimilarityDecay(),
        "ref": FacialMotionRef(),
        "inter": FacialMotionInter(),
        "dynamic": DynamicDegree(flow=SpeedFlow()),
    }


def feed(metrics, videos):
    """Score videos the way VideoEvaluator does: forward, one video per call."""
    for v in videos:
        metrics["id"](SIMS[v])
        metrics["decay"](SIMS[v])
        metrics["ref"](FACES[v], SIZE, REFERENCE)
        metrics["inter"](FACES[v], SIZE)
        metrics["dynamic"].flow.speed = SPEEDS[v]
        metrics["dynamic"](np.zeros((9, 256, 256, 3), np.uint8), 8.0)


def results(metrics):
    out = {}
    for name, metric in metrics.items():
        value = metric.compute()
        out.update({k: float(x) for k, x in value.items()} if isinstance(value, dict) else {name: float(value)})
    return out


def test_merged_instances_equal_one_instance():
    whole, first, second = make_metrics(), make_metrics(), make_metrics()
    feed(whole, range(8))
    feed(first, range(0, 8, 2))
    feed(second, range(1, 8, 2))
    for name in first:
        first[name].merge_state(second[name])
    assert results(first) == pytest.approx(results(whole))


def _worker(rank, init_file, out_file, layouts):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    synced = []
    for shares in layouts:  # one process group for every layout: spawning the pair is the slow part
        metrics = make_metrics()
        feed(metrics, shares[rank])
        synced.append(results(metrics))  # compute() gathers every rank's states
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(synced, f)
    dist.destroy_process_group()


def test_two_processes_sync_to_the_single_process_result(tmp_path):
    # Interleaved, and a rank with no video at all (more GPUs than eval videos): it must still sync.
    layouts = [[range(0, 8, 2), range(1, 8, 2)], [range(0), range(8)]]
    whole = make_metrics()
    feed(whole, range(8))
    out = tmp_path / "synced.json"
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(out), layouts), nprocs=2)
    synced = json.loads(out.read_text())
    assert len(synced) == len(layouts)
    for values in synced:
        assert values == pytest.approx(results(whole))
