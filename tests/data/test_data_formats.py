import json

import numpy as np
import pytest

from mm_lightning.data.formats import METADATA, Row, read_metadata
from mm_lightning.data.media import crop_boxes, resize_center_crop, sample_frame_indices


def _write(tmp_path, lines):
    (tmp_path / METADATA).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_parses_both_row_kinds(tmp_path):
    rows = read_metadata(
        _write(
            tmp_path,
            [
                json.dumps(
                    {
                        "kind": "image",
                        "image": "x.jpg",
                        "references": ["r1.jpg", "r2.jpg"],
                        "caption": "a man reading",
                        "identity": "id_007",
                    }
                ),
                "",  # blank lines are allowed
                json.dumps({"kind": "video", "video": "c.mp4", "caption": "a woman", "references": ["r.jpg"]}),
                json.dumps(
                    {
                        "kind": "video",
                        "video": "d.mp4",
                        "caption": "a person",
                        "reference_rule": "keyframe",
                        "keyframe": 12,
                        "fps": 24,
                    }
                ),
            ],
        )
    )
    assert rows == [
        Row(1, "image", "x.jpg", "a man reading", ("r1.jpg", "r2.jpg"), identity="id_007"),
        Row(3, "video", "c.mp4", "a woman", ("r.jpg",)),
        Row(4, "video", "d.mp4", "a person", (), keyframe=12, fps=24.0),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        "[1, 2]",
        '{"kind": "audio", "audio": "a.wav", "caption": "c", "references": ["r"]}',
        '{"kind": "image", "caption": "c", "references": ["r"]}',
        '{"kind": "image", "image": "x.jpg", "references": ["r"]}',
        '{"kind": "image", "image": "x.jpg", "caption": "c"}',
        '{"kind": "image", "image": "x.jpg", "caption": "c", "references": []}',
        '{"kind": "image", "image": "x.jpg", "caption": "c", "reference_rule": "keyframe"}',
        '{"kind": "video", "video": "v.mp4", "caption": "c", "references": ["r"], "reference_rule": "keyframe"}',
        '{"kind": "video", "video": "v.mp4", "caption": "c", "reference_rule": "random"}',
        '{"kind": "video", "video": "v.mp4", "caption": "c", "reference_rule": "keyframe", "keyframe": -1}',
        '{"kind": "video", "video": "v.mp4", "caption": "c", "references": ["r"], "fps": 0}',
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad):
    good = json.dumps({"kind": "image", "image": "x.jpg", "references": ["r.jpg"], "caption": "a man"})
    _write(tmp_path, [good, good, bad])
    with pytest.raises(ValueError, match=rf"{METADATA}:3: "):
        read_metadata(tmp_path)


def test_frame_sampling():
    # 30 fps clip at 8 fps: stride 4, window inside the clip
    idx = sample_frame_indices(100, 30.0, 5, 8.0, start=0.0)
    assert idx == [0, 4, 8, 12, 16]
    assert sample_frame_indices(100, 30.0, 5, 8.0, start=0.999)[-1] <= 99
    # too short for the stride: uniform over the clip, repeating frames when needed
    assert sample_frame_indices(10, 30.0, 5, 8.0, start=0.5) == [0, 2, 4, 7, 9]
    assert sample_frame_indices(3, 8.0, 5, 8.0, start=0.5) == [0, 0, 1, 2, 2]


def test_resize_center_crop_and_boxes_agree():
    image = np.zeros((100, 200, 3), np.uint8)
    image[40:60, 90:110] = 255  # a white square in the middle
    out = resize_center_crop(image, 50, 50)  # scale 0.5 -> 100x50, crop 25 px each side
    assert out.shape == (50, 50, 3)
    box = crop_boxes(np.array([[90, 40, 110, 60]], np.float32), 100, 200, 50, 50)[0]
    np.testing.assert_allclose(box, [20, 20, 30, 30])
    assert out[21:29, 21:29].min() > 200 and out[:, :18].max() == 0
