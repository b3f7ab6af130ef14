"""The evaluation pass's share of videos per rank (mm_lightning/evaluation_run.py)."""

import json

from mlflow import MlflowClient

import mm_lightning.evaluation_run as evaluation_run
from mm_lightning.config import load_config
from mm_lightning.module import MagicMirrorModule
from mm_lightning.tracking import ensure_experiment
from tests.helpers import store_uri


def test_every_rank_samples_as_many_videos_and_scores_only_its_own(tmp_path, monkeypatch):
    # Under FSDP and ZeRO-3 each forward pass is collective. With 3 videos on 2 ranks, rank 1 samples its one
    # video, then a repeat that is neither scored nor logged, while rank 0 samples its second: no rank waits alone.
    cfg = load_config(
        "full", overrides=["eval.max_videos=3", "sampling.num_inference_steps=1", f"cache_dir={tmp_path / 'cache'}"]
    )
    module = MagicMirrorModule(cfg, stage="video_finetune")
    seeds, sample_video = [], evaluation_run.sample_video
    monkeypatch.setattr(
        evaluation_run,
        "sample_video",
        lambda *args, **kwargs: seeds.append(kwargs["seed"]) or sample_video(*args, **kwargs),
    )
    client = MlflowClient(store_uri(tmp_path))
    run_id = client.create_run(ensure_experiment(client, "mm_lightning", store_uri(tmp_path))).info.run_id
    evaluation_run.evaluate_model(module, cfg, "video_finetune", client, run_id, step=1, rank=1, world_size=2)
    assert len(seeds) == 2 and seeds[0] == cfg.seed + 1  # its own video (index 1), then a repeat
    logged = client.download_artifacts(run_id, "eval/video_finetune/step1/rank1/per_video.json", str(tmp_path))
    assert [row["video"].split("_")[0] for row in json.loads(open(logged).read())] == ["001"]
    videos = [a.path for a in client.list_artifacts(run_id, "eval/video_finetune/step1/rank1/videos")]
    assert [v.rsplit("/", 1)[1].split("_")[0] for v in videos] == ["001"]
