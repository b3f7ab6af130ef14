"""Text alignment: CLIP image-text similarity of a video's frames to its prompt.

Per video: TA = mean_i cos(CLIP_img(frame_i), CLIP_txt(prompt)) over the sampled frames, the raw
cosine (not x100), the scale of the paper's 0.240. VBench's overall consistency scores the same way
with ViCLIP, a video CLIP; here a frame-wise CLIP from a local folder stands in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evaluation.video_mean import VideoMean

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


class TextAlignment(VideoMean):
    """mean over videos of TA; update(frames [K, H, W, 3] uint8 RGB, prompt).

    Built only from a complete local CLIP folder (`clip_unavailable_reason` is None): a number from
    random weights would look like a result and mean nothing.
    """

    higher_is_better = True

    def __init__(self, clip_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 **kwargs) -> None:
        reason = clip_unavailable_reason(clip_path)
        if reason:
            raise FileNotFoundError(reason)
        super().__init__(**kwargs)
        import transformers

        self.model = transformers.CLIPModel.from_pretrained(clip_path).eval().requires_grad_(False).to(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(clip_path)
        # The PIL backend where this transformers has it: the same pixels with or without torchvision.
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        self.image_processor = processor_cls.from_pretrained(clip_path)
        self.batch_size = batch_size

    @torch.no_grad()
    def video_score(self, frames: np.ndarray, prompt: str) -> float:
        device = next(self.model.parameters()).device
        text = self.tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(device)
        cosines = []
        for start in range(0, len(frames), self.batch_size):
            pixels = self.image_processor(images=list(frames[start:start + self.batch_size]), return_tensors="pt")
            out = self.model(**text, pixel_values=pixels["pixel_values"].to(device))
            # CLIPModel returns both embeddings L2-normalised, so the dot product is the cosine.
            cosines.append((out.image_embeds @ out.text_embeds.T).squeeze(1).float().cpu())
        return float(torch.cat(cosines).mean())

    def update(self, frames: np.ndarray, prompt: str) -> None:
        self._add_video(self.video_score(frames, prompt))
