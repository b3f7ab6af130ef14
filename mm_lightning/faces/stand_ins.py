"""Tiny ONNX stand-ins for an insightface model pack, shaped so insightface's own
model_zoo routes them exactly like the real ones: the random-weights `snapshot` ships them
(so evaluation and the identity loss run without the real pack), and the tests build theirs
with them. Hand-written here: insightface has no random-weight models to export.

- Detector (SCRFD layout, 9 outputs: scores / boxes / keypoints for strides 8, 16, 32 with
  2 anchors per location, input [1, 3, ?, ?]): fires only at stride 32, on every 32x32 cell
  of the detection frame that is bright (mean normalised pixel > 0.5), and predicts the
  fixed box and 5 keypoints ``CELL_BOX`` / ``CELL_KPS`` relative to that cell.
- Recogniser (ArcFace layout, input [N, 3, 112, 112], output [N, 512]): 8x8 average pooling
  then a seeded random linear layer, so the embedding depends on colours and layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
CELL = 32  # the detector's firing stride
DET_SIZE = 640  # detection frame the helpers assume (build_face_analyzer's default det_size)
# Box (x1, y1, x2, y2) and keypoints relative to a firing cell's top-left corner, in cells.
CELL_BOX = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)
CELL_KPS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], dtype=np.float32)
OPSET = 13


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    # The lowest IR version of the opset, not the installed onnx's own: an older onnxruntime (the GPU machines'
    # 1.30 reads IR <= 13) must load what a newer onnx wrote.
    opset = [helper.make_opsetid("", OPSET)]
    return helper.make_model(graph, opset_imports=opset, ir_version=helper.find_min_ir_version_for(opset))


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def write_scrfd_onnx(path) -> None:
    """The detector described in the module docstring."""
    nodes, outputs = [], {"score": [], "bbox": [], "kps": []}
    # distance2bbox: box = anchor + (-l, -t, r, b) * stride; distance2kps: kps = anchor + d * stride.
    box_dist = np.array([-CELL_BOX[0], -CELL_BOX[1], CELL_BOX[2], CELL_BOX[3]], dtype=np.float32)
    nodes += [
        _const("box_dist", box_dist[None]),
        _const("kps_dist", CELL_KPS.reshape(1, 10)),
        _const("zero", 0.0),
        _const("half", 0.5),
        _const("gain", 20.0),
        helper.make_node("Constant", [], ["flat"], value=numpy_helper.from_array(np.array([-1, 1], np.int64))),
    ]
    for s in STRIDES:
        # Per-cell mean brightness -> score, laid out like SCRFD: (y, x, anchor) flattened to [N, 1].
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("ReduceMean", [f"pool{s}"], [f"mean{s}"], axes=[1], keepdims=1),
            helper.make_node("Sub", [f"mean{s}", "half"], [f"centred{s}"]),
            helper.make_node("Mul", [f"centred{s}", "gain"], [f"logit{s}"]),
            helper.make_node("Sigmoid", [f"logit{s}"], [f"sig{s}"]),
            helper.make_node("Transpose", [f"sig{s}"], [f"hwc{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [f"hwc{s}", f"hwc{s}"], [f"anchors{s}"], axis=3),
            helper.make_node("Reshape", [f"anchors{s}", "flat"], [f"raw{s}"]),
        ]
        if s == CELL:
            nodes.append(helper.make_node("Identity", [f"raw{s}"], [f"score_{s}"]))
        else:  # other strides never fire
            nodes.append(helper.make_node("Mul", [f"raw{s}", "zero"], [f"score_{s}"]))
        # Constant regressions broadcast to [N, 4] / [N, 10] (score * 0 keeps the row count).
        nodes += [
            helper.make_node("Mul", [f"raw{s}", "zero"], [f"zeros{s}"]),
            helper.make_node("Add", [f"zeros{s}", "box_dist"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"zeros{s}", "kps_dist"], [f"kps_{s}"]),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],  # SCRFD's output order
    )
    onnx.save(_model(graph), str(path))


def write_arcface_onnx(path, seed: int = 0, mxnet_style: bool = False) -> None:
    """The recogniser described in the module docstring.

    With ``mxnet_style`` the graph starts with nodes named _minus0 / _mul0 that normalise raw
    pixels inside the model; insightface then feeds raw 0-255 pixels (mean 0, std 1).
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((512, 3 * 14 * 14)).astype(np.float32)
    nodes, first = [], "input.1"
    if mxnet_style:
        nodes += [
            _const("pixel_mean", 127.5),
            _const("pixel_scale", 1 / 127.5),
            helper.make_node("Sub", ["input.1", "pixel_mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "pixel_scale"], ["normalised"], name="_mul0"),
        ]
        first = "normalised"
    nodes += [
        helper.make_node("AveragePool", [first], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["embedding"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])],
        initializer=[
            numpy_helper.from_array(weight, "fc.weight"),
            numpy_helper.from_array(rng.standard_normal(512).astype(np.float32), "fc.bias"),
        ],
    )
    onnx.save(_model(graph), str(path))


def write_insightface_pack(root, name: str = "antelopev2") -> str:
    """An insightface root holding <root>/models/<name>/{scrfd_tiny,arcface_tiny}.onnx; returns root."""
    model_dir = Path(root) / "models" / name
    model_dir.mkdir(parents=True, exist_ok=True)
    write_scrfd_onnx(model_dir / "scrfd_tiny.onnx")
    write_arcface_onnx(model_dir / "arcface_tiny.onnx")
    return str(root)
