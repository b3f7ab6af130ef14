"""EMA of the trainable weights: differs from the raw weights after training, equals them at decay 0,
lives in checkpoints (weights-only final.ckpt included), resumes, and is what generate loads."""

import lightning as L
import pytest
import torch

from mm_lightning.config import ConfigError, load_config
from mm_lightning.curriculum import build_datamodule, build_trainer
from mm_lightning.ema import TrainableEMA, ema_callbacks
from mm_lightning.module import MagicMirrorModule


def _train(tmp_path, steps: int, decay: float, ckpt_path=None, module=None):
    cfg = load_config(
        "full",
        overrides=[
            "eval.enabled=false",
            "ema.enabled=true",
            f"ema.decay={decay}",
            f"curriculum.stages.image_pretrain.max_steps={steps}",
            "curriculum.stages.image_pretrain.batch_size=2",
        ],
    )
    L.seed_everything(0)
    module = module or MagicMirrorModule(cfg, stage="image_pretrain")
    [ema] = ema_callbacks(cfg)
    trainer = build_trainer(cfg, "image_pretrain", logger=False, callbacks=[ema], run_dir=tmp_path)
    datamodule = build_datamodule(cfg, "image_pretrain", module.transformer.face_encoder.clip_image_size)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, ema, trainer


def _raw(module) -> dict[str, torch.Tensor]:
    return {f"transformer.{k}": v for k, v in module.transformer.trainable_state_dict().items()}


def test_ema_differs_from_raw_weights_and_is_checkpointed(tmp_path):
    module, ema, trainer = _train(tmp_path, steps=3, decay=0.5)
    assert isinstance(ema, TrainableEMA) and ema.updates == 3
    raw, average = _raw(module), {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    assert set(average) == set(raw)  # only the trainable weights: no backbone, T5, VAE or CLIP copy
    assert max((average[k] - raw[k]).abs().max().item() for k in raw) > 1e-4

    trainer.save_checkpoint(tmp_path / "final.ckpt", weights_only=True)  # as the curriculum writes final.ckpt
    checkpoint = torch.load(tmp_path / "final.ckpt", weights_only=False)
    assert checkpoint["ema_updates"] == 3
    for k in raw:
        assert torch.equal(checkpoint["state_dict"][k], raw[k])
        assert torch.equal(checkpoint["ema_state_dict"][k], average[k])

    # generate/evaluate load the EMA by default, the raw weights when asked.
    loaded = MagicMirrorModule.from_checkpoint(str(tmp_path / "final.ckpt"))
    assert loaded.loaded_weights.startswith("EMA")
    assert all(torch.equal(v, average[k]) for k, v in _raw(loaded).items())
    loaded = MagicMirrorModule.from_checkpoint(str(tmp_path / "final.ckpt"), raw_weights=True)
    assert loaded.loaded_weights == "raw" and all(torch.equal(v, raw[k]) for k, v in _raw(loaded).items())

    # Evaluation swaps the EMA in and the raw weights back.
    with ema.swapped_in():
        assert all(torch.equal(v, average[k]) for k, v in _raw(module).items())
    assert all(torch.equal(v, raw[k]) for k, v in _raw(module).items())


def test_ema_equals_raw_weights_at_decay_zero(tmp_path):
    module, ema, _ = _train(tmp_path, steps=2, decay=0.0)
    raw, average = _raw(module), ema.averaged_state_dict()
    assert all(torch.equal(average[k], raw[k]) for k in raw)


def test_ema_resumes_from_the_checkpoint(tmp_path):
    decay = 0.5
    _, ema, trainer = _train(tmp_path, steps=2, decay=decay)
    saved = {k: v.clone() for k, v in ema.averaged_state_dict().items()}
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # a full checkpoint, as ModelCheckpoint writes last.ckpt
    module, resumed, _ = _train(tmp_path, steps=3, decay=decay, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.updates == 3
    # One more update on top of the restored average (a restarted EMA would equal the raw weights).
    raw = _raw(module)
    for k, v in resumed.averaged_state_dict().items():
        torch.testing.assert_close(v, decay * saved[k] + (1 - decay) * raw[k])


def test_ema_config_is_checked():
    with pytest.raises(ConfigError, match="ema.decay"):
        load_config("full", overrides=["ema.enabled=true", "ema.decay=1.5"])
    with pytest.raises(ConfigError, match="fsdp"):
        load_config("full", overrides=["ema.enabled=true", "trainer.strategy=fsdp"])
