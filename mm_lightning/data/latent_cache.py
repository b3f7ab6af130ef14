"""Precomputed VAE latents and T5 prompt embeddings (`python -m mm_lightning cache`).

At real scale the frozen VAE and T5 cost as much as the adapter's training step, and
they compute the same thing every epoch. The cache stores, per usable sample of a stage,
one safetensors file with `latents` [F', C, h, w] (already scaled), `prompt_embeds`
[L, Dt] and the rest of the sample (reference crop, identity embedding, face mask/boxes),
plus `index.json` holding the captions and the *settings* the cache was built with:
the profile, the VAE/T5/tokenizer configs, the stage's frames/size/fps, the face
backend and the dataset's metadata hash. Training uses the cache only when those
settings match today's; a mismatch is an error (StaleCacheError), never a silent reuse.

Video windows are sampled once, when the cache is built: a cached stage sees the same
window of each clip every epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from mm_lightning.data.dataset import collate
from mm_lightning.data.demo import ensure_demo_dataset


class StaleCacheError(RuntimeError):
    pass


def _file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(path.glob("*.json")) if path.is_dir() else [path]:
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def dataset_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.root) if cfg.data.root else ensure_demo_dataset(cfg.cache_dir)


def cache_settings(cfg: DictConfig, stage: str) -> dict:
    """Everything the cached tensors depend on."""
    s, w = cfg.curriculum.stages[stage], cfg.weights
    return {
        "profile": cfg.profile,
        "vae": _file_digest(Path(w.vae)),
        "text_encoder": _file_digest(Path(w.text_encoder)),
        "tokenizer": _file_digest(Path(w.tokenizer)),
        "image_encoder": _file_digest(Path(w.image_encoder)),
        "data": s.data,
        "frames": s.frames,
        "height": s.height,
        "width": s.width,
        "fps": cfg.data.fps,
        "face_backend": cfg.faces.backend,
        "insightface_model": cfg.faces.insightface_model,
        "metadata": _file_digest(dataset_root(cfg) / "metadata.jsonl"),
    }


def cache_dir(cfg: DictConfig, stage: str) -> Path:
    return dataset_root(cfg) / ".mm_latents" / stage


@torch.no_grad()
def write_cache(module, datamodule, cfg: DictConfig, stage: str) -> Path:
    """Encodes every usable sample of the stage once; written to a temp folder, then renamed."""
    out = cache_dir(cfg, stage)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    datamodule.setup("fit")
    captions = []
    for i in range(len(datamodule.dataset)):
        sample = datamodule.dataset[i]
        if sample is None:
            continue
        batch = collate([sample])
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        encoded = module.encode_batch(batch)
        tensors = {k: v for k, v in sample.items() if torch.is_tensor(v) and k != "pixels"}
        tensors["latents"] = encoded["latents"][0].contiguous().cpu()
        tensors["prompt_embeds"] = encoded["prompt_embeds"][0].contiguous().cpu()
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"{len(captions):06d}.safetensors")
        captions.append(sample["caption"])
    index = {"settings": cache_settings(cfg, stage), "captions": captions, "skipped": datamodule.skipped}
    (tmp / "index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class CachedDataset(Dataset):
    def __init__(self, folder: Path, captions: list[str]):
        self.folder, self.captions = folder, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        sample = load_file(self.folder / f"{i:06d}.safetensors")
        sample["caption"] = self.captions[i]
        return sample


class CachedDataModule(L.LightningDataModule):
    """Serves a stage from its latent cache: no VAE or T5 forward in the training step."""

    def __init__(self, folder: Path, index: dict, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.dataset = CachedDataset(folder, index["captions"])
        self.skipped = index["skipped"]
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )


def open_cache(cfg: DictConfig, stage: str) -> CachedDataModule | None:
    """The stage's cache when one exists; StaleCacheError when it was built with other settings."""
    folder = cache_dir(cfg, stage)
    if not (folder / "index.json").exists():
        return None
    index = json.loads((folder / "index.json").read_text())
    now = cache_settings(cfg, stage)
    changed = {k: (index["settings"].get(k), v) for k, v in now.items() if index["settings"].get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: cached {old!r} != now {new!r}" for k, (old, new) in changed.items())
        raise StaleCacheError(
            f"stale latent cache {folder} ({detail}); rebuild it with `python -m mm_lightning cache ...` "
            "or train without it: data.use_cache=false"
        )
    s = cfg.curriculum.stages[stage]
    return CachedDataModule(folder, index, s.batch_size, cfg.data.num_workers, cfg.seed)
