import numpy as np
import pytest

from mm_lightning.data.media import MediaReadError, read_image
from mm_lightning.evaluation.synthetic import astronaut, sliding_photo
from mm_lightning.evaluation.video_io import read_video, write_video


def test_round_trip_keeps_shape_fps_and_content(tmp_path):
    frames = sliding_photo(astronaut(), num_frames=9, size=(120, 180), speed=6, photo_height=100)
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert fps == pytest.approx(8.0)
    assert np.abs(decoded.astype(int) - frames).mean() < 6  # lossy H.264, same picture


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(MediaReadError, match="not found: .*absent.mp4"):
        read_video(tmp_path / "absent.mp4")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(MediaReadError, match="broken.mp4"):
        read_video(broken)


def test_images_come_back_as_rgb(tmp_path):
    import imageio.v2 as imageio

    imageio.imwrite(tmp_path / "grey.png", np.full((8, 6), 7, np.uint8))
    imageio.imwrite(tmp_path / "rgba.png", np.full((8, 6, 4), 9, np.uint8))
    assert read_image(tmp_path / "grey.png").shape == (8, 6, 3)
    assert read_image(tmp_path / "rgba.png").shape == (8, 6, 3)
    with pytest.raises(MediaReadError, match="image not found"):
        read_image(tmp_path / "absent.png")
