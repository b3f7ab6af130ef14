"""Each stage's global batch fixes the gradient accumulation for the world size it runs on."""

import pytest

from mm_lightning.config import ConfigError, load_config
from mm_lightning.curriculum import build_trainer, gradient_accumulation


def test_paper_global_batch_on_any_number_of_gpus():
    stages = load_config("full", "cogvideox-5b").curriculum.stages  # 64 images at 8 per GPU, 8 videos at 1
    assert [gradient_accumulation(stages.image_pretrain, n, "image_pretrain") for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert [gradient_accumulation(stages.video_finetune, n, "video_finetune") for n in (1, 8)] == [8, 1]
    with pytest.raises(ConfigError, match="global_batch 64 cannot be met with batch_size 8 on 3 device"):
        gradient_accumulation(stages.image_pretrain, 3, "image_pretrain")
    with pytest.raises(ConfigError, match="global_batch 64 cannot be met with batch_size 8 on 16 device"):
        gradient_accumulation(stages.image_pretrain, 16, "image_pretrain")


def test_trainer_gets_the_derived_accumulation(tmp_path):
    cfg = load_config("full", overrides=["curriculum.stages.image_pretrain.global_batch=12", "trainer.accelerator=cpu"])
    trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[], run_dir=tmp_path)
    assert trainer.world_size == 1 and trainer.accumulate_grad_batches == 3  # 12 = 4 per device x 3
    plain = build_trainer(
        load_config("full", overrides=["trainer.accelerator=cpu"]),
        "image_pretrain",
        logger=False,
        callbacks=[],
        run_dir=tmp_path,
    )
    assert plain.accumulate_grad_batches == 1  # tiny: no global batch, accumulate_grad_batches as given


def test_global_batch_config_errors():
    with pytest.raises(ConfigError, match="not a multiple of the per-device batch_size 4"):
        load_config("full", overrides=["curriculum.stages.image_pretrain.global_batch=6"])
    with pytest.raises(ConfigError, match="global_batch or accumulate_grad_batches, not both"):
        load_config(
            "full",
            overrides=[
                "curriculum.stages.image_pretrain.global_batch=8",
                "curriculum.stages.image_pretrain.accumulate_grad_batches=2",
            ],
        )
