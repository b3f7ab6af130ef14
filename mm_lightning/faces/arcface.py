"""Differentiable ArcFace: insightface's ONNX recogniser converted to torch by onnx2torch.

The identity loss back-propagates through the face embedder, which onnxruntime cannot do.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
import torch.nn.functional as F

from mm_lightning.faces.analysis import BACKENDS, build_face_analyzer


def _import_onnx2torch():
    """Import onnx2torch, which imports torchvision (NMS / RoIAlign converters) at import time.

    torchvision cannot be installed beside this CPU torch build and ArcFace uses neither op,
    so when it is missing a stub whose functions raise stands in during the import only
    (left in sys.modules it would fool other libraries' torchvision checks).
    """
    if importlib.util.find_spec("torchvision") is not None:
        import onnx2torch

        return onnx2torch

    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision is not installed; this ONNX op cannot be converted")

    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = unavailable
    torchvision = types.ModuleType("torchvision")
    torchvision.ops = ops
    sys.modules.update({"torchvision": torchvision, "torchvision.ops": ops})
    try:
        import onnx2torch
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    return onnx2torch


class DifferentiableArcFace(torch.nn.Module):
    """Frozen ArcFace embedder: [B, 3, 112, 112] RGB in [-1, 1] -> [B, 512] L2-normalised.

    Input normalisation follows insightface's ArcFaceONNX: pixels are mapped to
    (pixel - input_mean) / input_std, i.e. identity for the usual mean = std = 127.5 and
    raw 0-255 pixels for mxnet-era models that normalise inside the graph.
    """

    def __init__(self, net: torch.nn.Module, input_mean: float, input_std: float):
        super().__init__()
        self.net = net.requires_grad_(False)
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.eval()

    @classmethod
    def from_onnx(cls, path) -> DifferentiableArcFace:
        from insightface.model_zoo import ArcFaceONNX, get_model

        # insightface's own router decides that this is a recognition model and its mean/std.
        recogniser = get_model(str(path), providers=["CPUExecutionProvider"])
        if not isinstance(recogniser, ArcFaceONNX):
            raise ValueError(f"{path} is not an ArcFace recognition model (insightface routes it to {recogniser!r})")
        return cls(_import_onnx2torch().convert(str(path)), recogniser.input_mean, recogniser.input_std)

    @classmethod
    def from_insightface_root(cls, root, model_name: str = "antelopev2") -> DifferentiableArcFace:
        # The same file FaceAnalysis picks as the pack's recognition model.
        return cls.from_onnx(build_face_analyzer("insightface", root, model_name).recognition_model_file)

    def train(self, mode: bool = True) -> DifferentiableArcFace:
        # Always eval: a parent module's .train() must not switch BatchNorm to batch statistics.
        return super().train(False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        pixels = (faces + 1) * 127.5
        return F.normalize(self.net((pixels - self.input_mean) / self.input_std), dim=-1)


def differentiable_embedder(faces) -> DifferentiableArcFace | None:
    """Torch ArcFace for the identity loss, from a faces-settings object (`config.FacesConfig` or a config's
    `faces` section); None for dlib, whose embedder is not differentiable."""
    if faces.backend == "dlib":
        return None
    if faces.backend == "insightface":
        return DifferentiableArcFace.from_insightface_root(faces.insightface_root, faces.insightface_model)
    raise ValueError(f"unknown face backend {faces.backend!r}; choose one of {BACKENDS}")
