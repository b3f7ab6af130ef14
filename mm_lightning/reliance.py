"""The identity-reliance probe: how much the model's denoising uses the reference face.

The batch is fixed once: one sample per evaluation identity. Its first reference photo is
both the clean target (resized and cropped to the stage's size, held still over the stage's
frames) and the reference. Its first prompt is the caption. Noise and timesteps are fixed
too: seeded, with the timesteps spread evenly over the schedule. The diffusion loss is
computed twice on it:
- with each sample's own reference;
- with the reference of another identity, the next one with the same caption, so the text
  cannot make up for the swap. The noise stays the same.
`id_reliance` is mean(loss with the swapped reference - loss with its own). Zero-initialised
adapters make the two losses identical, so a fresh model reads exactly 0. The number grows
only as far as the model uses the face. The probe runs forward passes only: it is cheap
enough for every evaluation and every `eval.reliance_every_n_steps` training steps.

MagicMirror's paper has no such probe; it is this framework's own diagnostic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig

from mm_lightning.data.media import read_image, resize_center_crop
from mm_lightning.evaluation.eval_set import EvalItem, demo_eval_set, load_eval_set
from mm_lightning.faces import FaceAnalyzer, NoFaceError, face_analyzer
from mm_lightning.pipeline import reference_inputs


@dataclass
class RelianceResult:
    timesteps: list[int]
    own: torch.Tensor  # [K, B] diffusion loss per (timestep, sample) with the sample's own reference
    swapped: torch.Tensor  # [K, B] the same with another identity's reference

    @property
    def gap(self) -> torch.Tensor:
        return self.swapped - self.own  # [K, B]

    def metrics(self) -> dict[str, float]:
        """id_reliance, its relative form and its spread over the batch (std of the per-sample means)."""
        gap = self.gap
        return {
            "id_reliance": gap.mean().item(),
            "id_reliance_relative": (gap.mean() / self.own.mean()).item(),
            "id_reliance_std": gap.mean(0).std().item(),
        }


def donor_indices(captions: list[str]) -> list[int]:
    """For each sample, the sample whose reference replaces its own: the next one (cyclically)
    with the same caption, or the next one in the batch when no other sample shares it."""
    donors = []
    for i, caption in enumerate(captions):
        same = [j for j in range(len(captions)) if captions[j] == caption and j != i]
        donors.append(next((j for j in same if j > i), same[0]) if same else (i + 1) % len(captions))
    return donors


class RelianceProbe:
    """The fixed batch and noise, built once; `measure(module)` reads the model's reliance."""

    def __init__(
        self,
        items: list[EvalItem],
        analyzer: FaceAnalyzer,
        clip_size: int,
        max_identities: int = 0,
        num_timesteps: int = 4,
        seed: int = 0,
        max_batch: int = 8,
    ):
        first = {}  # identity -> its first item (eval sets list prompts by identity)
        for item in items:
            first.setdefault(item.identity, item)
        photos, ref_pixels, embeddings, self.captions, self.identities = [], [], [], [], []
        for item in first.values():
            if max_identities and len(self.identities) == max_identities:
                break
            photo = read_image(item.references[0])
            try:
                pixels, embedding = reference_inputs(analyzer, [photo], clip_size, [str(item.references[0])])
            except NoFaceError:  # the evaluation reports such an entry; the probe leaves it out
                continue
            photos.append(photo)
            ref_pixels.append(pixels)
            embeddings.append(embedding)
            self.captions.append(item.prompt)
            self.identities.append(item.identity)
        if len(self.identities) < 2:
            raise ValueError(
                f"the identity-reliance probe needs 2 or more evaluation identities with a detectable "
                f"face, found {len(self.identities)}"
            )
        self.photos = photos
        self.ref_pixels = torch.stack(ref_pixels)  # [B, 1, 3, S, S] in [0, 1]
        self.id_embedding = torch.stack(embeddings)  # [B, D]
        self.donors = donor_indices(self.captions)
        self.num_timesteps, self.seed, self.max_batch = num_timesteps, seed, max_batch
        self._encoded = {}  # (frames, height, width) -> clean latents, prompt embeddings, mask, noise

    @classmethod
    def from_config(cls, cfg: DictConfig, clip_size: int) -> RelianceProbe:
        items = load_eval_set(cfg.eval.eval_set or demo_eval_set(cfg.cache_dir))
        analyzer = face_analyzer(cfg.faces)
        return cls(
            items,
            analyzer,
            clip_size,
            cfg.eval.reliance_identities,
            cfg.eval.reliance_timesteps,
            cfg.eval.reliance_seed,
            cfg.eval.reliance_max_batch,
        )

    def encoded(self, module) -> tuple[torch.Tensor, ...]:
        """The batch at the module's stage size: clean latents [B, F', C, h, w], prompt embeddings,
        identity-token mask [B, L] and noise [K, B, F', C, h, w]. Frozen models, so computed once."""
        stage = module.stage_cfg
        key = (stage.frames, stage.height, stage.width)
        if key not in self._encoded:
            self._encoded[key] = self._encode(module, *key)
        return self._encoded[key]

    def _encode(self, module, frames: int, height: int, width: int):
        latents, prompt_embeds, masks = [], [], []
        device = module.device
        # The VAE samples its posterior: a seeded, forked RNG keeps it fixed and leaves training's RNG alone.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for photo, caption in zip(self.photos, self.captions, strict=True):  # one at a time: clips are large
                still = torch.from_numpy(resize_center_crop(photo, height, width)).permute(2, 0, 1).float() / 127.5 - 1
                pixels = still.expand(1, frames, -1, -1, -1).to(device)  # [1, F, 3, H, W] in [-1, 1]
                enc = module.encode_batch({"pixels": pixels, "caption": [caption]})
                latents.append(enc["latents"])
                prompt_embeds.append(enc["prompt_embeds"])
                masks.append(enc["identity_mask"])
        latents = torch.cat(latents)  # [B, F', C, h, w]
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_timesteps, *latents.shape), generator=generator).to(device)  # [K, B, F', C, h, w]
        return latents, torch.cat(prompt_embeds), torch.cat(masks), noise

    @torch.no_grad()
    def measure(self, module) -> RelianceResult:
        """Own- and swapped-reference diffusion losses of `module` (a MagicMirrorModule) at its current stage."""
        latents, prompt_embeds, mask, noise = self.encoded(module)
        was_training = module.training
        module.eval()
        transformer, device, dtype = module.transformer, module.device, module.transformer.dtype
        # Evenly spread over the schedule, each at the centre of its share: 125, 375, 625, 875 for 4 of 1000.
        num_train = module.scheduler.config.num_train_timesteps
        steps = [int((k + 0.5) * num_train / self.num_timesteps) for k in range(self.num_timesteps)]
        batch = len(latents)
        # Every (timestep, sample) pair, timestep-major, run in chunks of at most `max_batch` samples.
        sample = torch.arange(len(steps) * batch) % batch  # [K*B] -> sample index
        timesteps = torch.tensor(steps, device=device).repeat_interleave(batch)  # [K*B]
        noise = noise.flatten(0, 1)  # [K*B, F', C, h, w]
        own, swapped = [], []
        for chunk in torch.arange(len(sample)).split(self.max_batch):
            b = sample[chunk]
            for refs, out in ((b, own), (torch.tensor(self.donors)[b], swapped)):
                # The swap changes only the reference; caption, identity-token mask and noise stay the sample's own.
                face = transformer.encode_face(
                    self.ref_pixels[refs].to(device, dtype), self.id_embedding[refs].to(device, dtype), mask[b]
                )
                _, error = module.denoising_error(
                    latents[b].to(dtype), prompt_embeds[b].to(dtype), face, noise[chunk].to(dtype), timesteps[chunk]
                )
                out.append(error.flatten(1).mean(1).float().cpu())  # [chunk]
        module.train(was_training)
        shape = (len(steps), batch)
        return RelianceResult(steps, torch.cat(own).view(shape), torch.cat(swapped).view(shape))


def write_reliance_artifacts(folder: Path, result: RelianceResult, title: str) -> None:
    """id_reliance.png (reliance against timestep, the batch's std as error bar) and id_reliance.json."""
    gap = result.gap  # [K, B]
    fig = Figure(figsize=(5, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(result.timesteps, gap.mean(1).numpy(), yerr=gap.std(1).numpy(), fmt="o-", capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="timestep", ylabel="loss swapped - own", title=title)
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "id_reliance.png", dpi=80)
    values = {
        **result.metrics(),
        "timesteps": result.timesteps,
        "per_timestep": gap.mean(1).tolist(),
        "own_loss": result.own.mean(1).tolist(),
        "swapped_loss": result.swapped.mean(1).tolist(),
    }
    (folder / "id_reliance.json").write_text(json.dumps(values, indent=2))
