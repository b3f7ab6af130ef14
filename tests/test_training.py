"""Training: the loss falls, checkpoints hold only trained weights, NaN losses and gradients stop cleanly,
the latent cache round-trips and refuses stale settings."""

import lightning as L
import pytest
import torch

from mm_lightning.config import ConfigError, load_config
from mm_lightning.curriculum import build_datamodule, build_trainer
from mm_lightning.data.latent_cache import StaleCacheError, open_cache, write_cache
from mm_lightning.module import MagicMirrorModule, NonFiniteLossError


def _fixed_loss(module, batch) -> float:
    """Diffusion loss on one batch with fixed noise, timesteps and face-region draws."""
    module.eval()
    with torch.no_grad():
        loss = module.compute_loss(batch, generator=torch.Generator().manual_seed(123))["diffusion"].item()
    module.train()
    return loss


def test_training_lowers_the_loss_on_the_demo_data(tmp_path):
    cfg = load_config(
        "full",
        overrides=[
            "eval.enabled=false",
            f"output_dir={tmp_path}",
            "curriculum.stages.image_pretrain.max_steps=60",
        ],
    )
    L.seed_everything(0)
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before = _fixed_loss(module, batch)
    trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[], run_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    after = _fixed_loss(module, batch)
    # Same batch, same noise, same timesteps: only the trained weights differ. A 10% drop
    # cannot come from sampling luck.
    print(f"fixed-batch loss before {before:.4f}, after {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_checkpoints_hold_only_trainable_weights(tmp_path):
    cfg = load_config("full", overrides=["eval.enabled=false", "curriculum.stages.image_pretrain.max_steps=2"])
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[], run_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)["state_dict"]
    trainable = {f"transformer.{n}" for n, p in module.transformer.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert not any(".clip." in k or "text_encoder" in k or k.startswith("vae") for k in state)
    fresh = MagicMirrorModule(cfg, stage="image_pretrain")
    fresh.load_trainable(state)
    for name, p in fresh.transformer.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, module.transformer.get_parameter(name)), name


def test_non_finite_loss_stops_with_a_clear_error():
    cfg = load_config("full", overrides=["eval.enabled=false"])
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        module.transformer.face_encoder.face_queries.fill_(float("nan"))
        for block in module.transformer.base.transformer_blocks[::2]:
            block.to_v_face.weight.fill_(1.0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss in stage 'image_pretrain'.*--resume"):
        module.training_step(batch, 0)


class _PoisonGradientAtStep(L.Callback):
    """Puts a NaN into one trainable gradient after the backward of optimizer step `step`."""

    def __init__(self, step: int, name: str):
        self.step, self.name, self.weights_before = step, name, None

    def on_after_backward(self, trainer, module):
        if trainer.global_step == self.step:
            param = module.transformer.get_parameter(self.name)
            self.weights_before = param.detach().clone()
            param.grad.view(-1)[0] = float("nan")


def test_a_non_finite_gradient_stops_before_the_weights_take_it(tmp_path):
    cfg = load_config("full", overrides=["eval.enabled=false", "curriculum.stages.image_pretrain.max_steps=4"])
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    name = "base.transformer_blocks.0.can.2.weight"
    poison = _PoisonGradientAtStep(step=2, name=name)
    trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[poison], run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"non-finite gradients in stage 'image_pretrain' at step 2 .*{name}"):
        trainer.fit(module, datamodule=datamodule)
    assert torch.equal(module.transformer.get_parameter(name), poison.weights_before)  # not updated
    assert torch.isfinite(trainer.callback_metrics["train/image_pretrain/grad_norm"])  # step 1's norm, logged


def test_the_steps_deepspeed_skipped_are_logged():
    # DeepSpeed skips a step with non-finite gradients itself (they sit in its partitions): fit logs its count.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    class EngineStrategy(SingleDeviceStrategy):  # the attribute Lightning's DeepSpeedStrategy exposes
        deepspeed_engine = SimpleNamespace(skipped_steps=3)

    cfg = load_config("full", overrides=["eval.enabled=false"])
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    trainer = L.Trainer(
        max_steps=1,
        strategy=EngineStrategy(device="cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.callback_metrics["train/image_pretrain/skipped_steps"] == 3


def test_latent_cache_round_trip_and_stale_detection(tmp_path):
    overrides = ["eval.enabled=false", f"data.root={_copy_demo(tmp_path)}"]
    cfg = load_config("full", overrides=overrides)
    module = MagicMirrorModule(cfg, stage="video_finetune")
    size = module.transformer.face_encoder.clip_image_size
    datamodule = build_datamodule(cfg, "video_finetune", size, use_cache=False)
    write_cache(module, datamodule, cfg, "video_finetune")

    cached = build_datamodule(cfg, "video_finetune", size)
    assert cached is not None and type(cached).__name__ == "CachedDataModule"
    batch = next(iter(cached.train_dataloader()))
    assert batch["latents"].shape[1:] == (3, 4, 8, 8)  # 9 frames -> 3 latent frames, 64 px -> 8
    assert batch["prompt_embeds"].shape[1:] == (32, 32)
    losses = module.compute_loss(batch)
    assert torch.isfinite(losses["loss"])

    # Same encoded tensors as encoding the sample now (the cache stores what training computes).
    sample = cached.dataset[0]
    assert set(sample) >= {
        "latents",
        "prompt_embeds",
        "ref_pixels",
        "id_embedding",
        "face_mask",
        "face_boxes",
        "caption",
    }

    stale = load_config("full", overrides=overrides + ["curriculum.stages.video_finetune.height=72"])
    with pytest.raises(StaleCacheError, match="height: cached 64 != now 72"):
        open_cache(stale, "video_finetune")
    assert build_datamodule(stale, "video_finetune", size, use_cache=False) is not None


def _copy_demo(tmp_path):
    import shutil

    from mm_lightning.data.demo import ensure_demo_dataset

    cfg = load_config("full")
    root = tmp_path / "data"
    shutil.copytree(ensure_demo_dataset(cfg.cache_dir), root)
    return root


def test_training_timesteps_follow_loss_timestep_sampling():
    module = MagicMirrorModule(load_config("full", overrides=["eval.enabled=false"]), stage="image_pretrain")
    draw = lambda: module.sample_timesteps(20000, torch.Generator().manual_seed(0), "cpu").float()  # noqa: E731
    tiny = draw()  # the tiny profile: logit-normal around sigmoid(1.5) = 0.82 of the schedule
    assert 0 <= tiny.min() and tiny.max() <= 999 and 790 < tiny.median() < 850
    module.cfg.loss.timestep_sampling = "uniform"  # the paper's (base.yaml)
    uniform = draw()
    assert 0 <= uniform.min() and uniform.max() <= 999 and 480 < uniform.median() < 520
    with pytest.raises(ConfigError, match="loss.timestep_sampling must be uniform, logit_normal or mode"):
        load_config("full", overrides=["loss.timestep_sampling=lognormal"])
