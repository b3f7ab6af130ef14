"""The identity loss: ArcFace-aligned crops of decoded x0 estimates, below a timestep, reaching the adapter."""

import numpy as np
import pytest
import torch
from insightface.utils.face_align import norm_crop
from omegaconf import OmegaConf
from skimage import data

from mm_lightning.config import load_config
from mm_lightning.faces.crops import aligned_face_crops
from mm_lightning.faces.stand_ins import write_insightface_pack
from mm_lightning.module import MagicMirrorModule


def test_aligned_crops_match_insightface_norm_crop():
    image = data.astronaut()
    landmarks = np.array([[180, 110], [215, 108], [200, 130], [185, 150], [212, 149]], np.float32)
    expected = norm_crop(image, landmarks).astype(np.float32)  # insightface's own (OpenCV) alignment
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    crop = aligned_face_crops(pixels, torch.from_numpy(landmarks)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(crop - expected).mean() < 2.0  # bilinear vs OpenCV's fixed-point bilinear
    # Moving the landmarks moves the crop: the alignment really follows them.
    shifted = aligned_face_crops(pixels, torch.from_numpy(landmarks + 20)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(shifted - expected).mean() > 10


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    root = write_insightface_pack(tmp_path_factory.mktemp("insightface"))
    cfg = load_config(
        "full",
        overrides=[
            "faces.backend=insightface",
            f"faces.insightface_root={root}",
            "loss.identity_weight=1.0",
            "loss.identity_max_timestep=400",
        ],
    )
    return MagicMirrorModule(cfg, stage="image_pretrain")


def _batch(size=2, height=64, width=64):
    torch.manual_seed(0)
    landmarks = torch.tensor([[24.0, 26], [40, 26], [32, 34], [26, 44], [38, 44]])
    return {
        "pixels": torch.rand(size, 1, 3, height, width) * 2 - 1,
        "caption": ["a man smiling", "a woman walking"][:size],
        "ref_pixels": torch.rand(size, 3, 64, 64),
        "id_embedding": torch.nn.functional.normalize(torch.randn(size, 512), dim=-1),
        "face_mask": torch.ones(size, 1, 1, height, width),
        "face_boxes": torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(size, 1, 4),
        "face_landmarks": landmarks.expand(size, 1, 5, 2),
    }


def _fixed(module, batch):
    """The batch with its VAE latents and prompt embeddings drawn once (the VAE samples its posterior)."""
    torch.manual_seed(0)
    enc = module.encode_batch(batch)
    return batch | {"latents": enc["latents"], "prompt_embeds": enc["prompt_embeds"]}


def _identity_loss(module, batch, timesteps):
    enc = module.encode_batch(batch)
    face = module.transformer.encode_face(batch["ref_pixels"], batch["id_embedding"], enc["identity_mask"])
    noise = torch.randn(enc["latents"].shape, generator=torch.Generator().manual_seed(1))
    x0_pred, _ = module.denoising_error(enc["latents"], enc["prompt_embeds"], face, noise, timesteps)
    return module.identity_loss(x0_pred, batch, timesteps)


def test_identity_loss_only_below_the_timestep(module):
    batch = _batch()
    assert _identity_loss(module, batch, torch.tensor([900, 999])).item() == 0.0
    assert _identity_loss(module, batch, torch.tensor([100, 999])).item() > 0.0


@pytest.mark.slow
def test_identity_loss_reaches_the_adapter_and_falls(module):
    batch, timesteps = _fixed(module, _batch(size=1)), torch.tensor([100])
    params = [p for p in module.transformer.parameters() if p.requires_grad]
    module.transformer.zero_grad()
    first = _identity_loss(module, batch, timesteps)
    first.backward()
    reached = {n for n, p in module.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # The gradient goes through ArcFace, the crop, the decoder, the x0 estimate and the blocks.
    assert {"base.transformer_blocks.0.face_key_gate", "base.transformer_blocks.0.can.2.weight"} <= reached
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = [first.item()]
    for _ in range(5):
        optimizer.zero_grad()
        loss = _identity_loss(module, batch, timesteps)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.03, losses


def test_with_gradient_checkpointing_the_decoder_is_recomputed_with_the_same_gradient(module):
    checkpointed = MagicMirrorModule(
        OmegaConf.merge(module.cfg, {"trainer": {"gradient_checkpointing": True}}), "image_pretrain"
    )
    assert checkpointed.vae.decoder.gradient_checkpointing and not module.vae.decoder.gradient_checkpointing
    batch, timesteps = _fixed(module, _batch(size=1)), torch.tensor([100])
    grads = []
    for recompute in (False, True):
        module.vae.enable_gradient_checkpointing() if recompute else module.vae.disable_gradient_checkpointing()
        module.transformer.zero_grad()
        _identity_loss(module, batch, timesteps).backward()
        grads.append(module.transformer.get_parameter("base.transformer_blocks.0.can.2.weight").grad.clone())
    module.vae.disable_gradient_checkpointing()
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_tiled_identity_decode_reaches_the_adapter_and_leaves_tiling_off(module):
    batch, timesteps = _fixed(module, _batch(size=1)), torch.tensor([100])
    vae = module.vae
    sizes = (
        vae.tile_sample_min_height,
        vae.tile_sample_min_width,
        vae.tile_latent_min_height,
        vae.tile_latent_min_width,
    )
    # Tiles of half the 64x64 frame, so that this tiny VAE decodes 2x2 of them (its own are larger than the frame).
    vae.tile_sample_min_height = vae.tile_sample_min_width = 32
    vae.tile_latent_min_height = vae.tile_latent_min_width = 32 // module.pipe.vae_scale_factor_spatial
    grads, losses = [], []
    try:
        for tiled in (False, True):
            module.cfg.loss.identity_vae_tiling = tiled
            module.transformer.zero_grad()
            loss = _identity_loss(module, batch, timesteps)
            loss.backward()
            losses.append(loss.item())
            grads.append(module.transformer.get_parameter("base.transformer_blocks.0.can.2.weight").grad.flatten())
    finally:
        module.cfg.loss.identity_vae_tiling = False
        vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_latent_min_height, vae.tile_latent_min_width = (
            sizes
        )
    assert not vae.use_tiling
    assert grads[1].abs().sum() > 0 and losses[0] != losses[1]
