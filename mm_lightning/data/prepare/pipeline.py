"""The `prepare` pipeline: per-file processing in parallel, then identities, pairs and captions
over everything at once, then metadata.jsonl (formats.py) and the report."""

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mm_lightning.data.formats import METADATA
from mm_lightning.data.prepare.captions import Captioner, class_word, has_identity_word, template_caption
from mm_lightning.data.prepare.identities import DEFAULT_MIN_COSINE, group_identities
from mm_lightning.data.prepare.pairs import pair_items, reference_paths
from mm_lightning.data.prepare.process import RESULTS, init_worker, process_file, result_path
from mm_lightning.data.prepare.report import histogram, summarise
from mm_lightning.data.prepare.scan import InputFile

log = logging.getLogger(__name__)
# Settings a per-file result depends on; identity, pair and caption settings apply at merge time.
FILE_SETTINGS = (
    "scene_threshold",
    "min_shot_frames",
    "max_clips_per_shot",
    "min_brightness",
    "min_sharpness",
    "motion_scale",
    "face_frames",
    "detect_max_side",
    "min_face_size",
    "max_second_face",
    "min_face_presence",
)


def video_stage(cfg: DictConfig) -> tuple[int, float]:
    """(frames, fps) of the clips to cut: the curriculum's video stage at data.fps."""
    stages = [s for s in cfg.curriculum.stages.values() if s.data == "video"]
    return (stages[0].frames if stages else 49), float(cfg.data.fps)


def file_settings(cfg: DictConfig) -> dict:
    frames, fps = video_stage(cfg)
    settings = {k: cfg.prepare[k] for k in FILE_SETTINGS} | {
        "frames": frames,
        "fps": fps,
        "pair_min_cosine": cfg.data.pair_min_cosine,
        "faces": OmegaConf.to_container(cfg.faces),
        "flow": [cfg.eval.flow, cfg.eval.flow_max_side],
    }
    return settings | {"hash": hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]}


def process_files(
    files: list[InputFile], raw: Path, out: Path, settings: dict, num_workers: int, make_analyzer, make_motion
) -> list[dict]:
    """Each file's result, read back when an earlier run already processed it (same key)."""
    results, todo = [], []
    for f in files:
        done = result_path(out, f.key(settings["hash"]))
        if done.is_file():
            results.append(json.loads(done.read_text()))
        else:
            todo.append(f)
    if results:
        log.info("prepare: %d files already processed, %d to go", len(results), len(todo))
    workers = num_workers or os.cpu_count() or 1
    bar = tqdm(total=len(todo), desc="prepare", unit="file", dynamic_ncols=True)
    if workers == 1 or len(todo) <= 1:
        init_worker(make_analyzer, make_motion, settings["detect_max_side"])
        for f in todo:
            results.append(process_file(f, str(raw), str(out), settings))
            bar.update()
    else:
        with ProcessPoolExecutor(
            workers, initializer=init_worker, initargs=(make_analyzer, make_motion, settings["detect_max_side"])
        ) as pool:
            for future in as_completed([pool.submit(process_file, f, str(raw), str(out), settings) for f in todo]):
                results.append(future.result())
                bar.update()
    bar.close()
    return sorted(results, key=lambda r: r["source"])


def stored_results(out: Path, settings: dict) -> list[dict]:
    """Every result written under `out` with these settings (all shards), the newest per source."""
    newest: dict[str, tuple[float, dict]] = {}
    for path in (out / RESULTS).glob("*.json"):
        result = json.loads(path.read_text())
        if result.get("settings") == settings["hash"]:
            mtime = path.stat().st_mtime
            if result["source"] not in newest or newest[result["source"]][0] < mtime:
                newest[result["source"]] = (mtime, result)
    return [newest[k][1] for k in sorted(newest)]


def _caption(item: dict, label: str | None, cfg: DictConfig, captioner, out: Path) -> tuple[str, str]:
    """(caption, source: "sidecar" | "captioner" | "template")."""
    if item["caption"]:
        return item["caption"], "sidecar"
    if captioner is not None:
        from mm_lightning.data.media import read_image

        image = item["media"] if item["kind"] == "image" else item["keyframe_image"]
        return captioner(read_image(out / image)), "captioner"
    word = class_word(label, list(cfg.model.identity_words))
    return template_caption(item["kind"], word, cfg.model.trigger_word), "template"


def build_metadata(cfg: DictConfig, out: Path, results: list[dict]) -> tuple[dict, dict]:
    """Group identities, pair, caption, write metadata.jsonl. -> (report, values for the plots)."""
    start = time.perf_counter()
    items = [item for r in results for item in r["items"]]
    drops = [d for r in results for d in r["drops"]]
    dim = len(items[0]["embedding"]) if items else 1
    embeddings = np.array([item["embedding"] for item in items], np.float32).reshape(-1, dim)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    min_identity = cfg.prepare.identity_min_cosine
    if min_identity is None:
        min_identity = DEFAULT_MIN_COSINE[cfg.faces.backend]
    identities = group_identities(embeddings, [item["label"] for item in items], min_identity) if items else []
    pairings = pair_items(
        items, identities, embeddings, cfg.data.pair_min_cosine, cfg.data.pair_max_cosine, cfg.prepare.max_references
    )
    captioner = Captioner(cfg.prepare.captioner, cfg.prepare.caption_prompt) if cfg.prepare.captioner else None
    rows, cosines, caption_sources = [], [], {"sidecar": 0, "captioner": 0, "template": 0}
    for item, identity, pairing in zip(items, identities, pairings, strict=True):
        what = f"{item['source']} -> {item['media']}"
        if identity is None:
            drops.append({"what": what, "reason": "label_mismatch"})
            continue
        if pairing is None:
            drops.append({"what": what, "reason": "no_reference"})
            continue
        label = item["label"] or identity
        caption, source = _caption(item, label, cfg, captioner, out)
        if not has_identity_word(caption, list(cfg.model.identity_words), cfg.model.trigger_word):
            drops.append({"what": what, "reason": "caption_without_class_word"})
            continue
        caption_sources[source] += 1
        cosines += pairing.cosines
        row = {"kind": item["kind"], item["kind"]: item["media"], "caption": caption, "identity": identity}
        if pairing.keyframe:
            row |= {"reference_rule": "keyframe", "keyframe": item["keyframe"]}
        else:
            row["references"] = reference_paths(items, pairing)
        if item["kind"] == "video":
            row["fps"] = item["fps"]
        rows.append(row)
    if caption_sources["template"]:
        log.warning(
            "%d rows got a template caption (no sidecar, no prepare.captioner): captions carry only the class word",
            caption_sources["template"],
        )
    _write_atomic(out / METADATA, "".join(json.dumps(r) + "\n" for r in rows))
    sizes = Counter(row["identity"] for row in rows)
    report = {
        "out": str(out),
        "input": results[0].get("input", "") if results else "",
        "files": {
            "processed": len(results),
            "images": sum(r["kind"] == "image" for r in results),
            "videos": sum(r["kind"] == "video" for r in results),
        },
        "rows": {
            "image": sum(r["kind"] == "image" for r in rows),
            "video": sum(r["kind"] == "video" for r in rows),
            "video_cross_reference": sum(r["kind"] == "video" and "references" in r for r in rows),
        },
        "identities": {"count": len(sizes), "min_cosine": min_identity, "sizes": dict(sorted(sizes.items()))},
        "pairs": {
            "min_cosine": cfg.data.pair_min_cosine,
            "max_cosine": cfg.data.pair_max_cosine,
            "cosine": histogram(cosines),
        },
        "captions": caption_sources,
        "face_size": histogram([item["face_size"] for item in items]),
        "dropped": summarise(drops),
        "drops": sorted(drops, key=lambda d: d["what"]),
        "merge_seconds": time.perf_counter() - start,
    }
    plots = {
        "face_sizes": [item["face_size"] for item in items],
        "identity_sizes": list(sizes.values()),
        "cosines": cosines,
    }
    return report, plots


def _write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the dataset may be shared
    os.replace(tmp, path)
