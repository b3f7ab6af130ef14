"""MagicMirrorModule: the LightningModule that trains one curriculum stage.

It holds the full model (T5, VAE, scheduler and the adapted transformer with its face
encoder) and trains only the MagicMirror modules. The loss follows diffusers' CogVideoX
training recipe: v-prediction turned into an x0 estimate with `get_velocity`, compared
with the clean latents and weighted by 1 / (1 - alphas_cumprod[t]). On top of it come the
face-region loss and the optional ArcFace identity loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F

from mm_lightning.config import config_from_checkpoint, load_config
from mm_lightning.ema import find_ema
from mm_lightning.faces import differentiable_embedder
from mm_lightning.faces.crops import aligned_face_crops
from mm_lightning.memory import gib
from mm_lightning.models.loading import Components, frozen_dtype, load_components
from mm_lightning.models.magicmirror import compile_blocks
from mm_lightning.pipeline import build_pipeline
from mm_lightning.text import identity_token_mask


class NonFiniteLossError(FloatingPointError):
    pass


NOT_UPDATED = (
    ". The weights were not updated; the last checkpoint is kept. Lower the learning rate "
    "(curriculum.stages.<stage>.lr) or use 32-true precision, then `fit ... --resume`."
)


class MagicMirrorModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, stage: str, text_encoder: bool = True, vae: bool = True):
        """text_encoder / vae=False: T5 / the VAE are not loaded (fit, when caches cover every use)."""
        super().__init__()
        self.cfg = cfg
        self.stage = stage
        self.strict_loading = False  # checkpoints hold only the trainable weights
        components = load_components(cfg, text_encoder=text_encoder, vae=vae)
        self.transformer = components.transformer
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        # diffusers' pipeline, used for its prompt encoding and rotary embeddings (and sampling).
        self.pipe = build_pipeline(components)
        self.arcface = None
        if cfg.loss.identity_weight > 0:
            self.arcface = differentiable_embedder(cfg.faces)
            self.arcface.to(frozen_dtype(cfg))
        self.transformer.gradient_checkpointing = cfg.trainer.gradient_checkpointing
        if self.vae is not None and cfg.trainer.gradient_checkpointing:
            # The identity loss decodes frames with autograd: without this the decoder's full-resolution
            # activations wait for the backward (+19.4 GiB for one 480x720 frame at 5B). Without a gradient
            # (encoding, sampling) diffusers' VAE runs as usual.
            self.vae.enable_gradient_checkpointing()
        self._blocks_compiled = False

    @classmethod
    def from_checkpoint(
        cls,
        path: str | dict,
        overrides: list[str] = (),
        experiment: str | None = None,
        profile: str = "tiny",
        raw_weights: bool = False,
        to_device: bool = True,
    ) -> MagicMirrorModule:
        """A trained model for inference: the config stored in the checkpoint (or the named
        experiment's), the frozen weights from their local folders, the trained weights from the file:
        its EMA weights when it has them (ema.enabled), unless `raw_weights`. `loaded_weights` says which.
        `to_device=False` leaves the module on the CPU (for diffusers' CPU offloading). `path` may also be
        the checkpoint already loaded, so a caller that read it first does not load it twice."""
        if isinstance(path, dict):
            checkpoint = path
        elif Path(path).is_file():
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            raise FileNotFoundError(f"checkpoint not found: {path} (fit writes <run>/checkpoints/<stage>/final.ckpt)")
        cfg = (
            load_config(experiment, profile, overrides) if experiment else config_from_checkpoint(checkpoint, overrides)
        )
        module = cls(cfg, stage=checkpoint.get("mm_stage", cfg.curriculum.order[-1]))
        use_ema = "ema_state_dict" in checkpoint and not raw_weights
        module.load_trainable(checkpoint["ema_state_dict" if use_ema else "state_dict"])
        module.loaded_weights = f"EMA ({checkpoint['ema_updates']} updates)" if use_ema else "raw"
        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda and cfg.trainer.precision.startswith("bf16") else torch.float32
        module.to(dtype=dtype)
        if to_device and cuda:
            module.to("cuda")
        return module.eval()

    @property
    def stage_cfg(self) -> DictConfig:
        return self.cfg.curriculum.stages[self.stage]

    def setup(self, stage: str) -> None:
        """trainer.compile_blocks compiles the blocks for `fit` (training and its evaluation passes), once for all
        curriculum stages. `generate` and `evaluate` build the same module without this hook: `generate` follows
        sampling.compile_blocks, `evaluate` runs eager. Lightning calls it before the strategy wraps the model."""
        if stage == "fit" and self.cfg.trainer.compile_blocks and not self._blocks_compiled:
            compile_blocks(self.transformer.base.transformer_blocks)
            self._blocks_compiled = True

    def set_stage(self, stage: str) -> None:
        """The curriculum hands the same weights on to the next stage."""
        self.stage = stage

    def sampling_pipeline(self):
        """diffusers' CogVideoXPipeline over this module's models, with the sampling scheduler."""
        return build_pipeline(
            Components(self.tokenizer, self.text_encoder, self.vae, self.scheduler, self.transformer),
            self.cfg.sampling.scheduler,
        )

    # ---------------------------------------------------------------- inputs
    @torch.no_grad()
    def encode_batch(self, batch: dict) -> dict:
        """Latents, prompt embeddings and identity mask; from the caches when the batch has them."""
        max_len = self.transformer.config.max_text_seq_length
        if "latents" in batch:
            latents = batch["latents"]  # [B, F', C, h, w], already scaled
        else:
            video = batch["pixels"].to(self.vae.dtype).permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W]
            latents = self.vae.encode(video).latent_dist.sample() * self.vae.config.scaling_factor
            latents = latents.permute(0, 2, 1, 3, 4)  # [B, F', C, h, w]
        latents = pad_to_temporal_patch(latents, self.transformer.config.patch_size_t)
        if "prompt_embeds" in batch:
            prompt_embeds = batch["prompt_embeds"]
        else:
            prompt_embeds, _ = self.pipe.encode_prompt(
                batch["caption"], do_classifier_free_guidance=False, max_sequence_length=max_len, device=self.device
            )
        mask = identity_token_mask(
            self.tokenizer, batch["caption"], self.cfg.model.identity_words, self.cfg.model.trigger_word, max_len
        )
        return {"latents": latents.float(), "prompt_embeds": prompt_embeds, "identity_mask": mask.to(self.device)}

    def rotary(self, latents: torch.Tensor):
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        scale = self.pipe.vae_scale_factor_spatial
        height, width = latents.shape[-2] * scale, latents.shape[-1] * scale
        return self.pipe._prepare_rotary_positional_embeddings(height, width, latents.shape[1], self.device)

    # ---------------------------------------------------------------- loss
    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        enc = self.encode_batch(batch)
        latents = enc["latents"]
        batch_size = latents.shape[0]
        face = self.transformer.encode_face(batch["ref_pixels"], batch["id_embedding"], enc["identity_mask"])

        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = self.sample_timesteps(batch_size, generator, latents.device)
        x0_pred, error = self.denoising_error(latents, enc["prompt_embeds"], face, noise, timesteps)

        # Face-region loss: for a share of the samples only the (latent-size) face mask counts.
        face_mask = F.adaptive_max_pool3d(
            batch["face_mask"].transpose(1, 2).float(), latents.shape[1:2] + latents.shape[-2:]
        )
        face_mask = face_mask.transpose(1, 2)  # [B, F', 1, h, w]
        use_face = (
            torch.rand(batch_size, generator=generator, device=latents.device) < self.cfg.loss.face_region_fraction
        )
        full_loss = error.flatten(1).mean(1)
        masked = (error * face_mask).flatten(1).sum(1) / (face_mask.expand_as(error).flatten(1).sum(1)).clamp(min=1)
        diffusion = torch.where(use_face, masked, full_loss).mean()
        losses = {"diffusion": diffusion, "face_region_share": use_face.float().mean()}
        loss = diffusion
        if self.arcface is not None:
            losses["identity"] = self.identity_loss(x0_pred, batch, timesteps)
            loss = loss + self.cfg.loss.identity_weight * losses["identity"]
        losses["loss"] = loss
        return losses

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """[B] training timesteps in [0, num_train_timesteps), drawn as loss.timestep_sampling says."""
        loss = self.cfg.loss
        u = compute_density_for_timestep_sampling(
            loss.timestep_sampling, batch_size, loss.logit_mean, loss.logit_std, loss.mode_scale, device, generator
        )  # [B] in [0, 1]
        num_t = self.scheduler.config.num_train_timesteps
        return (u * num_t).long().clamp(max=num_t - 1)

    def denoising_error(
        self, latents: torch.Tensor, prompt_embeds: torch.Tensor, face, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The x0 estimate and the weighted squared error [B, F', C, h, w] for given noise and timesteps
        (the training loss draws them; the identity-reliance probe fixes them)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        rotary = self.rotary(latents)
        # Inputs in the backbone's dtype: under autocast this is the cast autocast makes anyway, and under
        # DeepSpeed's bf16 (the whole model cast to bf16, no autocast) fp32 latents would meet bf16 weights.
        dtype = self.transformer.dtype
        model_output = self.transformer(
            noisy.to(dtype), prompt_embeds.to(dtype), timesteps, image_rotary_emb=rotary, face=face
        )[0]
        x0_pred = self.scheduler.get_velocity(model_output, noisy, timesteps)  # v-prediction -> x0 estimate
        alphas_cumprod = self.scheduler.alphas_cumprod.to(latents.device)[timesteps]
        weights = (1 / (1 - alphas_cumprod)).view(-1, 1, 1, 1, 1)
        return x0_pred, weights * (x0_pred.float() - latents) ** 2

    def identity_loss(self, x0_pred: torch.Tensor, batch: dict, timesteps: torch.Tensor) -> torch.Tensor:
        """1 - cos(ArcFace(reference), ArcFace(decode(x0_hat))) on the first `identity_frames` latent frames,
        over the samples whose timestep is below loss.identity_max_timestep (0 when none is).

        Near t = T the x0 estimate is mostly noise and its "face" says nothing about identity.
        Only the chosen latent frames of the chosen samples are decoded: decoding is the costly
        part. Latent frame k of CogVideoX's causal VAE maps to video frame 4k (frame 0 for k=0).
        Each crop is ArcFace-aligned by the similarity transform of the frame's cached landmarks."""
        keep = timesteps < self.cfg.loss.identity_max_timestep
        if not keep.any():
            return x0_pred.new_zeros(())
        n = min(self.cfg.loss.identity_frames, x0_pred.shape[1])
        latents = x0_pred[keep, :n].permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor  # [b, C, n, h, w]
        if self.cfg.loss.identity_vae_tiling:
            self.vae.enable_tiling()
        try:
            frames = self.vae.decode(latents.to(self.vae.dtype)).sample  # [b, 3, T, H, W] in [-1, 1]
        finally:
            self.vae.disable_tiling()  # the VAE is shared with sampling, which sets its own
        step = self.pipe.vae_scale_factor_temporal
        landmarks = batch["face_landmarks"][keep]  # [b, F, 5, 2] training-frame pixels
        reference = batch["id_embedding"][keep].float()
        sims = []
        for k in range(n):
            t = min(k * step, frames.shape[2] - 1)
            crops = aligned_face_crops(frames[:, :, t].float(), landmarks[:, min(t, landmarks.shape[1] - 1)])
            sims.append(F.cosine_similarity(self.arcface(crops), reference, dim=-1))
        return (1 - torch.stack(sims)).mean()

    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:  # every sample of this batch failed to load; they were counted
            return None
        losses = self.compute_loss(batch)
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"non-finite loss in stage {self.stage!r} at step {self.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                + NOT_UPDATED
            )
        self.log_dict(
            {f"train/{self.stage}/{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=len(batch["caption"])
        )
        self.log("loss", losses["loss"], prog_bar=True, logger=False, batch_size=len(batch["caption"]))
        self.log(f"train/{self.stage}/lr", self.optimizers().param_groups[0]["lr"])
        return losses["loss"]

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        stage, optim = self.stage_cfg, self.cfg.optim
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        optimizer = optimizer_class(optim.name)(
            params, lr=stage.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        total, warmup = max(stage.max_steps, 1), optim.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            if optim.lr_schedule == "constant":
                return 1.0
            decay = 1 - progress if optim.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Under FSDP the gradients are sharded: FSDP's own clip_grad_norm_ takes the norm over every shard
        (Lightning's FSDP precision refuses the Trainer's norm clipping). Elsewhere Lightning's clipping."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Logs the gradients' total norm (before clipping), and stops before the weights take a non-finite one:
        the last checkpoint then holds the weights this step started from. Under DeepSpeed the gradients sit in
        its partitions (a parameter's .grad is None): DeepSpeed skips such a step itself, counted in
        train/<stage>/skipped_steps; so does fp16's loss scaler."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return
        grads = {n: p.grad for n, p in self.transformer.named_parameters() if p.grad is not None}
        squared = torch.zeros((), device=self.device)
        if grads:
            squared = torch.nn.utils.get_total_norm(list(grads.values())).float().square()
        if isinstance(strategy, FSDPStrategy):  # each rank holds a shard of the gradients: the same norm on all
            squared = strategy.reduce(squared, reduce_op="sum")
        norm = squared.sqrt()
        self.log(f"train/{self.stage}/grad_norm", norm)
        if not torch.isfinite(norm) and getattr(self.trainer.precision_plugin, "scaler", None) is None:  # fp16's
            bad = [name for name, grad in grads.items() if not grad.isfinite().all()]
            raise NonFiniteLossError(
                f"non-finite gradients in stage {self.stage!r} at step {self.global_step} (norm {norm.item():.4g}; "
                f"{len(bad)} tensors, e.g. {', '.join(bad[:3])})" + NOT_UPDATED
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)  # Lightning's DeepSpeedStrategy
        if engine is not None:
            self.log(f"train/{self.stage}/skipped_steps", float(engine.skipped_steps))
        if self.device.type == "cuda":
            # The most any rank's tensors have held since the process started: the training steps, the
            # checkpoints, the probe and the evaluations. nvidia-smi shows the allocator's cache on top.
            # Lightning's DeviceStatsMonitor would log all ~80 allocator statistics every batch.
            peak = gib(torch.cuda.max_memory_allocated(self.device))
            self.log(f"train/{self.stage}/gpu_peak_gib", peak, reduce_fx="max", sync_dist=True)

    def on_train_start(self) -> None:
        if getattr(self.trainer.strategy, "zero_stage_3", False):  # Lightning's DeepSpeedStrategy(stage=3)
            gather_face_encoder_with_transformer(self.transformer)

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The trained weights, picked from the state dict the strategy gathered: under FSDP a rank's parameters
        # are its shards, and FSDP's full state dict (on rank 0) holds them whole.
        trained = {f"transformer.{name}" for name in self.transformer.trainable_names()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["mm_stage"] = self.stage
        checkpoint["mm_config"] = OmegaConf.to_container(self.cfg, resolve=True)  # generate/evaluate rebuild from it
        ema = find_ema(self.trainer)  # here, not in the callback: weights-only saves (final.ckpt) skip callbacks
        if ema is not None and ema.updated:
            checkpoint["ema_state_dict"] = ema.averaged_state_dict()  # same keys as state_dict
            checkpoint["ema_updates"] = ema.updates

    def load_trainable(self, state_dict: dict) -> None:
        prefix = "transformer."
        weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        missing = self.transformer.trainable_names() - set(weights)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        self.transformer.load_state_dict(weights, strict=False)


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """optim.name -> the optimiser. AdamW keeps two fp32 states per trainable parameter (about 13 GiB for
    the 5B profile's 1.79B); torchao's AdamW8bit keeps them block-wise quantised to 8 bits (about 3.3 GiB),
    the master weights and gradients staying fp32."""
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit
    return torch.optim.AdamW


def gather_face_encoder_with_transformer(transformer) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter and gathers a module's own parameters again for its backward
    only when it finds tensors in the module's output. The face encoder returns a FaceConditioning, so its own
    parameters (the learned face queries) would still be partitioned when their gradient arrives (an empty tensor
    meets a [1, Nf, P] gradient). Registered as the transformer's external parameters, they are gathered for the
    transformer's backward, which encloses theirs; its inputs (latents, prompt embeddings) carry no gradient, so
    DeepSpeed releases them when the backward pass ends."""
    import deepspeed

    for param in transformer.face_encoder.parameters(recurse=False):
        deepspeed.zero.register_external_parameter(transformer, param)


def pad_to_temporal_patch(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """CogVideoX 1.5 patches 2 latent frames together: its own fine-tuning recipe pads the latent
    frames [B, F', C, h, w] to a multiple of patch_size_t by repeating the first one in front
    (at sampling, diffusers' pipeline pads likewise and drops the padding before decoding)."""
    extra = (-latents.shape[1]) % patch_size_t if patch_size_t else 0
    return torch.cat([latents[:, :1].expand(-1, extra, -1, -1, -1), latents], dim=1) if extra else latents
