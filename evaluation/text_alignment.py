"""Text alignment: CLIP image-text similarity of a video's frames to its prompt, via torchmetrics' CLIPScore.

Per video: TA = CLIPScore(sampled frames, prompt) / 100 = max(mean_i cos(CLIP_img(frame_i), CLIP_txt(prompt)), 0),
the scale of the paper's 0.240 (CLIPScore is 100 x the mean cosine, clipped at 0; real frames and prompts
do not reach a negative mean cosine on a trained CLIP). The paper reports VBench's Overall Consistency, which
scores the same way with ViCLIP, a video CLIP; here a frame-wise CLIP from a local folder stands in.
`TextAlignment.provenance` names the checkpoint and the SHA-256 of its weights, logged with every value.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from mm_lightning.evaluation.video_mean import VideoMean

# Alternatives per role: a folder needs one file of each group.
_CLIP_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "image processor": ("preprocessor_config.json",),
}


def clip_unavailable_reason(clip_path: str | Path | None) -> str | None:
    """Why text alignment cannot be built from `clip_path` (a sentence for an MLflow tag); None when it can."""
    if not clip_path:
        return "text_alignment skipped: no CLIP path configured (eval.clip_path / --clip-path)"
    folder = Path(clip_path)
    if not folder.is_dir():
        return f"text_alignment skipped: CLIP folder {folder} does not exist"
    missing = [role for role, names in _CLIP_FILES.items() if not any((folder / n).is_file() for n in names)]
    if missing:
        return f"text_alignment skipped: CLIP folder {folder} lacks {', '.join(missing)} files"
    return None


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over the folder's weight files (sorted by name), streamed: a few seconds for CLIP ViT-L."""
    digest = hashlib.sha256()
    for path in sorted(
        p
        for p in Path(folder).iterdir()
        if p.name in _CLIP_FILES["weights"] or (p.name.startswith("model-") and p.suffix == ".safetensors")
    ):
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


class _FeatureTensors(torch.nn.Module):
    """CLIPModel as torchmetrics 1.9's CLIPScore calls it: transformers 5 returns get_*_features as a
    ModelOutput whose pooler_output holds the projected embedding; CLIPScore expects that tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class TextAlignment(VideoMean):
    """mean over videos of TA; update(frames [K, H, W, 3] uint8 RGB, prompt).

    Built only from a complete local CLIP folder (`clip_unavailable_reason` is None): a number from
    random weights would look like a result and mean nothing.
    """

    higher_is_better = True

    def __init__(
        self, clip_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16, **kwargs
    ) -> None:
        reason = clip_unavailable_reason(clip_path)
        if reason:
            raise FileNotFoundError(reason)
        super().__init__(**kwargs)
        import transformers
        from torchmetrics.multimodal import CLIPScore

        self.model = transformers.CLIPModel.from_pretrained(clip_path).eval().requires_grad_(False).to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(clip_path)
        # The PIL backend where this transformers has it: the same pixels with or without torchvision.
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        self.image_processor = processor_cls.from_pretrained(clip_path)
        processor = transformers.CLIPProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
        # CLIPScore loads by hub name unless given a callable: ours hands it the local model.
        self.clip_score = CLIPScore(
            model_name_or_path=lambda: (_FeatureTensors(self.model), processor), sync_on_compute=False
        )
        self.batch_size = batch_size
        self.provenance = f"CLIPScore on {Path(clip_path).name} (weights sha256 {weights_sha256(clip_path)})"

    @torch.no_grad()
    def video_score(self, frames: np.ndarray, prompt: str) -> float:
        self.clip_score.reset()
        device = next(self.model.parameters()).device  # CLIPScore moves the model to the images' device
        for start in range(0, len(frames), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start : start + self.batch_size]))
            self.clip_score.update(batch.permute(0, 3, 1, 2).to(device), [prompt] * len(batch))  # [B, 3, H, W] uint8
        return float(self.clip_score.compute()) / 100

    def update(self, frames: np.ndarray, prompt: str) -> None:
        self._add_video(self.video_score(frames, prompt))
