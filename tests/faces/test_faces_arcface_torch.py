"""DifferentiableArcFace: onnx2torch conversion of the recogniser matches insightface + onnxruntime."""

import sys

import cv2
import numpy as np
import pytest
import torch
from insightface.model_zoo import get_model

from mm_lightning.config import FacesConfig
from mm_lightning.faces import DifferentiableArcFace, differentiable_embedder
from mm_lightning.faces.stand_ins import write_arcface_onnx, write_insightface_pack


def rgb_crops(n=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 14, 14, 3), dtype=np.uint8)
    return np.stack([cv2.resize(b, (112, 112), interpolation=cv2.INTER_CUBIC) for b in base])


@pytest.mark.parametrize("mxnet_style", [False, True])
def test_matches_insightface_onnxruntime(tmp_path, mxnet_style):
    path = tmp_path / "rec.onnx"
    write_arcface_onnx(path, seed=1, mxnet_style=mxnet_style)
    model = DifferentiableArcFace.from_onnx(path)
    assert (model.input_mean, model.input_std) == ((0.0, 1.0) if mxnet_style else (127.5, 127.5))

    crops = rgb_crops()
    # insightface's own preprocessing (BGR in, mean/std, swapRB) and onnxruntime as the reference.
    reference = get_model(str(path), providers=["CPUExecutionProvider"]).get_feat(list(crops[..., ::-1]))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    faces = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = model(faces)
    assert out.shape == (3, 512)
    np.testing.assert_allclose(out.detach().numpy(), reference, atol=1e-4)
    assert np.abs(reference[0] - reference[1]).max() > 0.01  # distinct inputs give distinct embeddings


def test_gradients_reach_input_only(tmp_path):
    write_arcface_onnx(tmp_path / "rec.onnx")
    model = DifferentiableArcFace.from_onnx(tmp_path / "rec.onnx")
    torch.nn.Sequential(model).train()  # a parent's train() must leave the frozen embedder in eval
    assert not model.training and not any(m.training for m in model.modules())
    faces = (torch.from_numpy(rgb_crops(2)).permute(0, 3, 1, 2).float() / 127.5 - 1).requires_grad_()
    target = model(faces[1:]).detach()
    loss = 1 - torch.nn.functional.cosine_similarity(model(faces[:1]), target).mean()
    loss.backward()
    assert faces.grad is not None and faces.grad[0].abs().sum() > 0 and torch.isfinite(faces.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_from_insightface_root_uses_pack_recogniser(tmp_path):
    root = write_insightface_pack(tmp_path)
    model = differentiable_embedder(FacesConfig("insightface", str(root), "antelopev2"))
    assert isinstance(model, DifferentiableArcFace)
    assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 512)
    assert differentiable_embedder(FacesConfig("dlib")) is None
    with pytest.raises(ValueError, match="dlib.*insightface"):
        differentiable_embedder(FacesConfig("facenet", str(root)))
    torchvision = sys.modules.get("torchvision")
    assert torchvision is None or torchvision.__spec__ is not None  # the import stub (no spec) must not leak
