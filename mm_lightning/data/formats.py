"""On-disk dataset format.

A dataset is a folder with a `metadata.jsonl` file: one JSON object per line, blank lines
ignored, every path relative to the folder.

Image-pair rows (stage 1): a target image plus one or more reference images of the same
person. The identity embedding is the mean over the references.

    {"kind": "image", "image": "x.jpg", "references": ["r1.jpg", "r2.jpg"],
     "caption": "a man reading a book", "identity": "id_007"}

Video rows (stage 2): a clip plus either reference images, or a rule that takes the
reference face from a frame of the clip itself.

    {"kind": "video", "video": "clip.mp4", "caption": "...", "references": ["r1.jpg"]}
    {"kind": "video", "video": "clip.mp4", "caption": "...", "reference_rule": "keyframe",
     "keyframe": 12, "fps": 24}

- "keyframe" (optional, default 0) is the frame index the reference face is cropped from.
- "fps" (optional) overrides the frame rate read from the container, for files whose
  header lies.
- "identity" (optional, any row) is a free-form label, kept for bookkeeping only.

The caption should contain a class word ("man", "woman", "person", ...) or a trigger
word: those are the tokens where the identity embedding is fused into the text.

A malformed line raises ValueError naming the file and the line number. Rows that parse
but whose files turn out bad (unreadable, corrupt, no face) are not errors: the face
cache pass (faces_cache.py) skips and counts them.
"""

import json
from dataclasses import dataclass
from pathlib import Path

METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in metadata.jsonl, for messages
    kind: str  # "image" | "video"
    media: str  # target image or video, relative to the dataset root
    caption: str
    references: tuple[str, ...]  # empty when the reference is a keyframe of the video
    keyframe: int = 0
    fps: float | None = None
    identity: str | None = None


def _parse(obj, line: int) -> Row:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in ("image", "video"):
        raise ValueError(f'"kind" must be "image" or "video", got {kind!r}')
    media = obj.get(kind)
    if not isinstance(media, str) or not media:
        raise ValueError(f'a {kind} row needs a non-empty "{kind}" path')
    caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError('"caption" must be a non-empty string')
    refs = obj.get("references")
    rule = obj.get("reference_rule")
    if kind == "image" and rule is not None:
        raise ValueError('"reference_rule" is only for video rows')
    if (refs is None) == (rule is None):
        raise ValueError('give exactly one of "references" or "reference_rule"')
    if refs is not None and (not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs)):
        raise ValueError('"references" must be a non-empty list of paths')
    if rule is not None and rule != "keyframe":
        raise ValueError(f'unknown "reference_rule" {rule!r} (only "keyframe")')
    keyframe = obj.get("keyframe", 0)
    if not isinstance(keyframe, int) or isinstance(keyframe, bool) or keyframe < 0:
        raise ValueError('"keyframe" must be a non-negative integer')
    fps = obj.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise ValueError('"fps" must be a positive number')
    identity = obj.get("identity")
    if identity is not None and not isinstance(identity, str):
        raise ValueError('"identity" must be a string')
    return Row(line, kind, media, caption, tuple(refs or ()), keyframe, None if fps is None else float(fps), identity)


def read_metadata(root: str | Path) -> list[Row]:
    """Parse <root>/metadata.jsonl; raises ValueError("<file>:<line>: why") on a bad line."""
    path = Path(root) / METADATA
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rows.append(_parse(json.loads(text), n))
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{n}: {e}") from e
    return rows
