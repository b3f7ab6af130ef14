"""Dtype policy (frozen modules bf16, trainable fp32 master weights), T5/VAE left out when
caches cover fit, and the out-of-memory message of a training step."""

import torch

from mm_lightning.cli import main
from mm_lightning.config import load_config
from mm_lightning.module import MagicMirrorModule
from tests.helpers import PAPER_TRAINING


def _split(module: MagicMirrorModule):
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return trainable, frozen


def test_bf16_mixed_keeps_frozen_modules_bf16_and_trainable_ones_fp32():
    cfg = load_config("full", overrides=["trainer.precision=bf16-mixed", "eval.enabled=false", *PAPER_TRAINING])
    module = MagicMirrorModule(cfg, stage="image_pretrain")
    trainable, frozen = _split(module)
    assert trainable and frozen
    assert {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    for part in (module.transformer.face_encoder.clip, module.text_encoder, module.vae):  # wholly frozen
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}

    optimizer = module.configure_optimizers()["optimizer"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in trainable}

    # One step under bf16 autocast, as Lightning's bf16-mixed runs it: gradients reach only the
    # trainable fp32 weights, and a 1e-5 update survives (it would round away in bf16).
    batch = _image_batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.compute_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert all(p.grad is None for p in frozen)
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all(p.grad.dtype == torch.float32 for p in with_grad)
    before = [p.detach().clone() for p in with_grad]
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 1e-5, 0.0
    optimizer.step()
    changed = sum(not torch.equal(b, p) for b, p in zip(before, with_grad, strict=True))
    assert changed == len(with_grad)


def test_trainer_compile_blocks_compiles_for_fit_only():
    # generate and evaluate build the same module from a checkpoint's config: trainer.compile_blocks must not
    # compile their blocks behind sampling.compile_blocks' back.
    cfg = load_config("full", overrides=["trainer.compile_blocks=true"])
    module = MagicMirrorModule(cfg, stage="image_pretrain", text_encoder=False, vae=False)
    blocks = module.transformer.base.transformer_blocks
    assert all(block._compiled_call_impl is None for block in blocks)
    module.setup("fit")
    compiled = [block._compiled_call_impl for block in blocks]
    assert all(c is not None for c in compiled)
    module.setup("fit")  # the next curriculum stage: the same compiled blocks
    assert all(block._compiled_call_impl is c for block, c in zip(blocks, compiled))


def test_frozen_dtype_float32_keeps_everything_fp32_under_bf16_mixed():
    cfg = load_config("full", overrides=["trainer.precision=bf16-mixed", "trainer.frozen_dtype=float32"])
    module = MagicMirrorModule(cfg, stage="image_pretrain", text_encoder=False, vae=False)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert module.text_encoder is None and module.vae is None


def test_fit_leaves_t5_and_vae_out_only_when_caches_cover_every_use(tmp_path):
    from mm_lightning.curriculum import build_datamodule, frozen_models_needed
    from mm_lightning.data.latent_cache import write_cache
    from tests.test_training import _copy_demo

    overrides = ["eval.enabled=false", f"data.root={_copy_demo(tmp_path)}", "curriculum.order=[video_finetune]"]
    cfg = load_config("full", overrides=overrides)
    assert frozen_models_needed(cfg) == {"text_encoder": True, "vae": True}  # no cache yet
    module = MagicMirrorModule(cfg, stage="video_finetune")
    size = module.transformer.face_encoder.clip_image_size
    write_cache(module, build_datamodule(cfg, "video_finetune", size, use_cache=False), cfg, "video_finetune")
    assert frozen_models_needed(cfg) == {"text_encoder": False, "vae": False}
    assert frozen_models_needed(load_config("full", overrides=overrides[1:]))["text_encoder"]  # eval samples

    lean = MagicMirrorModule(cfg, stage="video_finetune", **frozen_models_needed(cfg))
    batch = next(iter(build_datamodule(cfg, "video_finetune", size).train_dataloader()))
    assert torch.isfinite(lean.compute_loss(batch)["loss"])


def test_out_of_memory_in_a_step_names_stage_batch_and_options_and_keeps_the_checkpoint(
    tmp_path, mlflow_uri, monkeypatch, capsys
):
    real = MagicMirrorModule.compute_loss
    calls = {"n": 0}

    def runs_out_at_step_5(self, batch, generator=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, batch, generator)

    monkeypatch.setattr(MagicMirrorModule, "compute_loss", runs_out_at_step_5)
    code = main(
        [
            "fit",
            "--experiment",
            "full",
            "eval.enabled=false",
            f"output_dir={tmp_path}",
            "trainer.checkpoint_every_n_steps=2",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "CUDA out of memory in stage 'image_pretrain' at per-device batch 4" in err
    for option in ("fsdp", "deepspeed_stage_2", "8-bit AdamW", "cache", "accumulate_grad_batches=2", "--resume"):
        assert option in err
    assert "Traceback" not in err
    (last,) = tmp_path.glob("*/checkpoints/image_pretrain/last.ckpt")
    assert torch.load(last, weights_only=False)["global_step"] == 4


def _image_batch(cfg):
    from mm_lightning.curriculum import build_datamodule

    datamodule = build_datamodule(cfg, "image_pretrain", cfg.architecture.image_encoder.image_size, use_cache=False)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))
