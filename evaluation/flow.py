"""Optical flow estimators for dynamic degree and motion smoothness.

An estimator is any callable (frame_a, frame_b) -> flow: two uint8 RGB frames [H, W, 3] in,
float [h, w, 2] out, (dx, dy) in pixels of the flow's own grid. The grid may be smaller than the
frame (a downscaled estimate): dynamic degree derives its threshold from the flow's size.

VBench uses RAFT (raft-things checkpoint, 20 refinement iterations, full resolution, RGB). `RaftFlow`
runs torchvision's RAFT port on a local weights file when torchvision imports (`eval.flow=raft`,
`eval.flow_weights=...`). The offline default is OpenCV's DIS flow at full resolution: on the
known displacements of benchmarks/flow_displacement.md (1-64 px per frame, whole-frame and local
160-px patch motion, 480x720) it keeps VBench's dynamic/static decision right at every displacement,
where Farneback under-reads fast local motion (a 48 px/frame patch read as 5.5 px at 360 px).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

FLOWS = ("dis", "farneback", "raft")


class FlowEstimator(Protocol):
    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray: ...


def _gray(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    """uint8 [h, w] grayscale, shrunk (INTER_AREA) so that its longest side is at most max_side."""
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return gray


class FarnebackFlow:
    """cv2.calcOpticalFlowFarneback on grayscale frames (pyramid scale 0.5, `levels` levels).

    A polynomial-expansion method: smooth, and it under-reads motions its pyramid cannot bridge.
    Measured (benchmarks/flow_displacement.md): whole-frame shifts are read well up to ~32 px, but a
    local patch moving 24+ px per frame is under-read badly, at full size and shrunk alike.
    """

    def __init__(
        self,
        max_side: int | None = None,
        levels: int = 5,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.1,
    ) -> None:
        self.max_side = max_side
        self.params = (0.5, levels, winsize, iterations, poly_n, poly_sigma, 0)

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(
            _gray(frame_a, self.max_side), _gray(frame_b, self.max_side), None, *self.params
        )


class DISFlow:
    """OpenCV's DIS optical flow (Kroeger et al. 2016): coarse-to-fine patch search plus variational refinement.

    Our defaults change OpenCV's "medium" preset in three ways, chosen on benchmarks/flow_displacement.md:
    - patch_size 4 (preset 8): OpenCV starts at the coarsest scale where the image is about
      4 * patch_size wide, so smaller patches start one level coarser. That lets the search reach
      64 px per frame: with 8 px patches a 160-px patch moving 48 px read as 6 px;
    - refinement_iterations 0 (preset 5): the variational smoothing pulled the fastest local motion
      back towards the static background (64 px read as 8.8);
    - finest_scale 2 (preset 1): the last patch search runs at a quarter of the pixels and is upsampled;
      the reading changed by under 0.5 px at every displacement, at a quarter of the cost.
    None keeps the preset's value. max_side shrinks the frames first (as FarnebackFlow).
    """

    PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }

    def __init__(
        self,
        preset: str = "medium",
        patch_size: int | None = 4,
        patch_stride: int | None = 2,
        finest_scale: int | None = 2,
        refinement_iterations: int | None = 0,
        max_side: int | None = None,
    ) -> None:
        if preset not in self.PRESETS:
            raise ValueError(f"unknown DIS preset {preset!r}; choose one of {sorted(self.PRESETS)}")
        self.max_side = max_side
        self._dis = cv2.DISOpticalFlow_create(self.PRESETS[preset])
        setters = {
            self._dis.setPatchSize: patch_size,
            self._dis.setPatchStride: patch_stride,
            self._dis.setFinestScale: finest_scale,
            self._dis.setVariationalRefinementIterations: refinement_iterations,
        }
        for setter, value in setters.items():
            if value is not None:
                setter(value)

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        return self._dis.calc(_gray(frame_a, self.max_side), _gray(frame_b, self.max_side), None)


class RaftFlow:
    """torchvision's RAFT-large as VBench runs its RAFT: RGB at full resolution, 20 iterations.

    weights: a local state-dict file for torchvision.models.optical_flow.raft_large (e.g. the
    Raft_Large_Weights.C_T_V2 file, or VBench's raft-things.pth converted to torchvision's key names).
    Frames are padded to a multiple of 8 by edge replication (VBench's InputPadder pads with the edge
    too), and to at least 128 px a side, the smallest input RAFT's 4-level correlation pyramid takes
    (small tiny-profile frames); the flow is cropped back, so the grid is the frame's own size.
    """

    def __init__(self, weights: str | Path, iterations: int = 20, device: str | None = None) -> None:
        import torch

        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"RAFT weights file {path} does not exist (eval.flow_weights)")
        try:
            from torchvision.models.optical_flow import raft_large
        except ImportError as err:  # also a torchvision built for another torch, which fails on import
            raise ImportError(f"eval.flow=raft needs torchvision's RAFT, which does not import here: {err}") from err
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = raft_large(weights=None, progress=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.model.eval().requires_grad_(False).to(self.device)
        self.iterations = iterations

    def _tensor(self, frame: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float().to(self.device)
        h, w = x.shape[-2:]
        pad_h, pad_w = max(128, h + -h % 8) - h, max(128, w + -w % 8) - w
        # [1, 3, H', W'] in [-1, 1], as torchvision's RAFT expects; VBench's RAFT maps 0..255 the same way.
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="replicate")
        return x / 127.5 - 1.0, (pad_h // 2, pad_w // 2, h, w)

    def __call__(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        import torch

        (a, (top, left, h, w)), (b, _) = self._tensor(frame_a), self._tensor(frame_b)
        with torch.no_grad():
            flow = self.model(a, b, num_flow_updates=self.iterations)[-1]  # [1, 2, H', W'], last refinement
        return flow[0, :, top : top + h, left : left + w].permute(1, 2, 0).float().cpu().numpy()


def build_flow(name: str, max_side: int | None = None, weights: str | None = None) -> FlowEstimator:
    """The estimator a config names: "dis" (default), "farneback", or "raft" (needs torchvision and weights)."""
    if name == "dis":
        return DISFlow(max_side=max_side)
    if name == "farneback":
        return FarnebackFlow(max_side=max_side)
    if name == "raft":
        if not weights:
            raise FileNotFoundError(
                "eval.flow=raft needs a local RAFT weights file: set eval.flow_weights "
                "(--flow-weights), e.g. torchvision's raft_large_C_T_V2 state dict"
            )
        return RaftFlow(weights)
    raise ValueError(f"unknown flow estimator {name!r}; choose one of {FLOWS}")
