"""Input conventions: which files are media, their caption sidecars, folder labels, shards.

RAW_DIR is walked recursively. Next to a media file, `NAME.txt` is its caption; a
`captions.jsonl` anywhere in the tree maps paths (relative to that file's folder) to captions:
`{"path": "clip.mp4", "caption": "a woman ..."}`. The first folder level under RAW_DIR,
when a file sits below it, is the file's identity label (`RAW/<identity>/...`); files at
the top level have none.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
SIDECAR_SUFFIXES = {".txt", ".jsonl"}
CAPTIONS_FILE = "captions.jsonl"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    path: str  # relative to RAW_DIR, posix
    kind: str  # "image" | "video"
    label: str | None  # first folder under RAW_DIR, the identity hint
    caption: str | None  # from a sidecar
    size: int
    mtime_ns: int

    def key(self, settings: str) -> str:
        """Names the file's result: the same path, size, mtime, caption and settings are not processed twice."""
        raw = json.dumps([self.path, self.size, self.mtime_ns, self.caption, settings])
        return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _captions_files(root: Path) -> dict[str, str]:
    captions = {}
    for index in sorted(root.rglob(CAPTIONS_FILE)):
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                path = (index.parent / obj["path"]).resolve().relative_to(root.resolve()).as_posix()
                captions[path] = str(obj["caption"])
            except (ValueError, KeyError, TypeError) as e:  # a bad line costs its caption, not the run
                log.warning('%s:%d skipped: expected {"path": ..., "caption": ...} (%s)', index, n, e)
    return captions


def scan_input(root: Path, out: Path | None = None) -> tuple[list[InputFile], list[str]]:
    """(media files sorted by path, paths of other files that are neither media nor sidecars).

    Hidden files and folders are skipped, and so is `out` when it lies inside `root`.
    """
    captions = _captions_files(root)
    files, ignored = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if out is not None and p.is_relative_to(out):
            continue
        rel = p.relative_to(root).as_posix()
        suffix = p.suffix.lower()
        kind = "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None
        if kind is None:
            if suffix not in SIDECAR_SUFFIXES:
                ignored.append(rel)
            continue
        sidecar = p.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else captions.get(rel)
        parts = p.relative_to(root).parts
        stat = p.stat()
        files.append(
            InputFile(rel, kind, parts[0] if len(parts) > 1 else None, caption or None, stat.st_size, stat.st_mtime_ns)
        )
    return files, ignored


def shard(files: list[InputFile], num_shards: int, shard_index: int) -> list[InputFile]:
    """This shard's files: a stable hash of the path, so shards don't depend on what else is in the tree."""
    return [f for f in files if int(hashlib.sha1(f.path.encode()).hexdigest(), 16) % num_shards == shard_index]
