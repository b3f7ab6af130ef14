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

from mm_lightning.faces import Face, FaceAnalyzer, face_crop, mean_identity_embedding
from mm_lightning.models.face_encoder import FaceConditioning
from mm_lightning.models.loading import Components, sampling_scheduler
from mm_lightning.text import identity_token_mask


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


def offload(pipe: CogVideoXPipeline, mode: str, device: str | None = None) -> None:
    """diffusers' own CPU offloading (accelerate hooks); `device` None: the accelerator diffusers finds.

    model: one whole model (T5, transformer, VAE) on the GPU at a time; sequential: one layer at a
    time (least memory, slowest). Weights must be on the CPU before (from_checkpoint(to_device=False))."""
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode != "none":
        raise ValueError(f"offload mode must be none, model or sequential, got {mode!r}")


def quantize_int8(pipe: CogVideoXPipeline, text_encoder: bool = True) -> None:
    """torchao int8 weight-only quantisation of every linear layer of T5 (unless its prompts are encoded
    already) and the adapted transformer (as CogVideoX's own quantised inference does; the VAE is
    convolutions and stays as it is)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for model in (pipe.text_encoder, pipe.transformer) if text_encoder else (pipe.transformer,):
        quantize_(model, Int8WeightOnlyConfig())


def reference_inputs(analyzer: FaceAnalyzer, images: list[np.ndarray], clip_size: int, names: list[str] | None = None):
    """Reference photos -> (ref_pixels [R, 3, S, S] in [0, 1], id embedding [D]).

    Raises NoFaceError, naming the photo, when one has no detectable face, so that
    `generate` stops before any denoising."""
    names = names or [f"reference image {i}" for i in range(len(images))]
    return face_inputs(images, [analyzer.require_face(img, name) for img, name in zip(images, names)], clip_size)


def face_inputs(images: list[np.ndarray], faces: list[Face], clip_size: int):
    """Reference photos and their detected faces -> (ref_pixels [R, 3, S, S] in [0, 1], id embedding [D])."""
    crops = np.stack([face_crop(img, face, clip_size) for img, face in zip(images, faces)])
    ref_pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    return ref_pixels, torch.from_numpy(mean_identity_embedding(faces)).float()


def encode_face(
    pipe: CogVideoXPipeline, ref_pixels: torch.Tensor, id_embedding: torch.Tensor, mask: torch.Tensor
) -> FaceConditioning:
    """Face conditioning on the pipeline's execution device, with or without diffusers' CPU offloading.

    Model offload keeps the transformer (the face encoder is part of it) on the CPU until its
    forward is called: encode where its weights are, then move the result. Sequential offload
    leaves the weights on the meta device and accelerate's hooks bring each layer to the GPU."""
    transformer, target = pipe.transformer, pipe._execution_device
    weights = next(transformer.face_encoder.parameters()).device
    run_on = target if weights.type == "meta" else weights
    dtype = transformer.dtype
    face = transformer.encode_face(ref_pixels.to(run_on, dtype), id_embedding.to(run_on, dtype), mask.to(run_on))
    moved = [None if t is None else t.to(target) for t in (face.x_id, face.x_face, face.identity_mask)]
    return FaceConditioning(*moved)


@torch.no_grad()
def encode_prompts(
    pipe: CogVideoXPipeline, cfg: DictConfig, prompt: str, negative_prompt: str | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T5 embeddings of the prompt and, under classifier-free guidance, of `negative_prompt` (None:
    `sampling.negative_prompt`), on `device` (None: the pipeline's execution device)."""
    s = cfg.sampling
    return pipe.encode_prompt(
        prompt,
        s.negative_prompt if negative_prompt is None else negative_prompt,
        do_classifier_free_guidance=s.guidance_scale > 1.0,
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        device=device or pipe._execution_device,
    )


def _set(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner), leaf, tensor)


@torch.no_grad()
def encode_prompts_then_load(
    pipe: CogVideoXPipeline, cfg: DictConfig, prompt: str, negative_prompt: str | None = None, device="cuda"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a pipeline whose models all wait on the CPU (generate without offloading): T5 alone comes to
    `device`, encodes the prompts and goes back; only then do the transformer and the VAE come. The peak is
    max(T5, transformer + VAE + denoising) instead of their sum: 8.9 GiB less at 5B (bf16).

    T5 goes back by pointing its parameters at the CPU tensors kept from before, not by copying its GPU
    weights back (hand-written: `.to("cpu")` would copy; 8 s for T5-XXL's 9.5 GB on an H200, 8% of a video)."""
    t5 = pipe.text_encoder
    # `.to` may move a Parameter's data in place, so keep the CPU data itself; one new Parameter per old one
    # afterwards, so that tied weights stay tied.
    kept = {name: (p.data, id(p), p.requires_grad) for name, p in t5.named_parameters(remove_duplicate=False)}
    buffers = dict(t5.named_buffers(remove_duplicate=False))
    t5.to(device)
    embeds = encode_prompts(pipe, cfg, prompt, negative_prompt, device)
    back = {}
    for name, (data, key, requires_grad) in kept.items():
        _set(t5, name, back.setdefault(key, torch.nn.Parameter(data, requires_grad)))
    for name, cpu_buffer in buffers.items():
        _set(t5, name, cpu_buffer)
    pipe.transformer.to(device)
    pipe.vae.to(device)
    return embeds


@torch.no_grad()
def sample_video(
    pipe: CogVideoXPipeline,
    cfg: DictConfig,
    prompt: str,
    ref_pixels: torch.Tensor,  # [R, 3, S, S]
    id_embedding: torch.Tensor,  # [D]
    seed: int,
    negative_prompt: str | None = None,
    prompt_embeds: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> np.ndarray:
    """One video, uint8 [T, H, W, 3].

    Under classifier-free guidance the unconditional branch encodes `negative_prompt`
    (None: `sampling.negative_prompt`); it carries no identity tokens, and keeps x_face and CAN's
    x_id residual as sampling.guidance_uncond_face / guidance_uncond_id say.
    `prompt_embeds`: (prompt, negative prompt) embeddings made before, e.g. by `encode_prompts_then_load`."""
    s = cfg.sampling
    max_len = pipe.transformer.config.max_text_seq_length
    mask = identity_token_mask(pipe.tokenizer, [prompt], cfg.model.identity_words, cfg.model.trigger_word, max_len)
    face = encode_face(pipe, ref_pixels.unsqueeze(0), id_embedding.unsqueeze(0), mask)
    if s.guidance_scale > 1.0:
        face = face.for_guidance(s.guidance_uncond_face, s.guidance_uncond_id)
    embeds, negative_embeds = prompt_embeds or encode_prompts(pipe, cfg, prompt, negative_prompt)
    # Slicing/tiling are decode-time memory savers; switched off again afterwards because
    # the VAE is shared with training, whose encoder must not run tiled.
    if s.vae_slicing:
        pipe.vae.enable_slicing()
    if s.vae_tiling:
        pipe.vae.enable_tiling()
    try:
        frames = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative_embeds,
            num_frames=s.num_frames,
            height=s.height,
            width=s.width,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            attention_kwargs={"face": face},
            output_type="np",
        ).frames[0]  # [T, H, W, 3] float in [0, 1]
    finally:
        pipe.vae.disable_slicing()
        pipe.vae.disable_tiling()
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
