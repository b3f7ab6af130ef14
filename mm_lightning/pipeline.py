"""Sampling with diffusers' CogVideoXPipeline driving the MagicMirror transformer.

The pipeline is diffusers' own: prompt encoding, latents, rotary embeddings, classifier-
free guidance, the CogVideoX DDIM/DPM schedulers and VAE decoding. MagicMirror only adds
the face conditioning, handed to the transformer through `attention_kwargs`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import CogVideoXPipeline
from omegaconf import DictConfig

from .faces import FaceAnalyzer, face_crop, mean_identity_embedding
from .models.loading import Components, sampling_scheduler
from .text import identity_token_mask


def build_pipeline(components: Components, scheduler: str | None = None) -> CogVideoXPipeline:
    sched = components.scheduler if scheduler is None else sampling_scheduler(scheduler, components.scheduler.config)
    pipe = CogVideoXPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        transformer=components.transformer,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_inputs(analyzer: FaceAnalyzer, images: list[np.ndarray], clip_size: int, names: list[str] | None = None):
    """Reference photos -> (ref_pixels [R, 3, S, S] in [0, 1], id embedding [D]).

    Raises NoFaceError, naming the photo, when one has no detectable face, so that
    `generate` stops before any denoising."""
    names = names or [f"reference image {i}" for i in range(len(images))]
    faces = [analyzer.require_face(img, name) for img, name in zip(images, names)]
    crops = np.stack([face_crop(img, face, clip_size) for img, face in zip(images, faces)])
    ref_pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    return ref_pixels, torch.from_numpy(mean_identity_embedding(faces)).float()


@torch.no_grad()
def sample_video(
    pipe: CogVideoXPipeline,
    cfg: DictConfig,
    prompt: str,
    ref_pixels: torch.Tensor,  # [R, 3, S, S]
    id_embedding: torch.Tensor,  # [D]
    seed: int,
) -> np.ndarray:
    """One video, uint8 [T, H, W, 3]."""
    s, device = cfg.sampling, pipe.transformer.device
    max_len = pipe.transformer.config.max_text_seq_length
    mask = identity_token_mask(pipe.tokenizer, [prompt], cfg.model.identity_words, cfg.model.trigger_word, max_len)
    dtype = pipe.transformer.dtype
    face = pipe.transformer.encode_face(
        ref_pixels.unsqueeze(0).to(device, dtype), id_embedding.unsqueeze(0).to(device, dtype), mask.to(device)
    )
    if s.guidance_scale > 1.0:
        face = face.for_guidance()
    # Slicing/tiling are decode-time memory savers; switched off again afterwards because
    # the VAE is shared with training, whose encoder must not run tiled.
    if s.vae_slicing:
        pipe.vae.enable_slicing()
    if s.vae_tiling:
        pipe.vae.enable_tiling()
    try:
        frames = pipe(
            prompt=prompt,
            negative_prompt=s.negative_prompt,
            num_frames=s.num_frames,
            height=s.height,
            width=s.width,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            max_sequence_length=max_len,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            attention_kwargs={"face": face},
            output_type="np",
        ).frames[0]  # [T, H, W, 3] float in [0, 1]
    finally:
        pipe.vae.disable_slicing()
        pipe.vae.disable_tiling()
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
