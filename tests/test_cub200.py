"""CUB-200-2011 from a small fake tree in the distributed layout."""

import numpy as np
import pytest
from PIL import Image

from harness.data import load_imageset
from harness.data._decode import DatasetError
from harness.data.cub200 import CUB200Params


def make_tree(root, n_classes=3, per_class=4):
    (root / "images").mkdir(parents=True)
    images, labels, split, boxes = [], [], [], []
    classes = [f"{c + 1:03d}.Bird_{c}" for c in range(n_classes)]
    image_id = 0
    for c, name in enumerate(classes):
        (root / "images" / name).mkdir()
        for k in range(per_class):
            image_id += 1
            rel = f"{name}/img_{k}.jpg"
            mode = ["RGB", "L", "CMYK", "P"][k % 4]  # grayscale, CMYK and palette images load as RGB
            colour = {"RGB": (c * 60, 10, 200), "L": c * 60, "CMYK": (c * 60, 0, 0, 0), "P": c}[mode]
            img = Image.new(mode, (40 + k, 30), color=colour)
            img.save(root / "images" / rel, format="PNG" if k == 3 else "JPEG")  # a PNG saved under .jpg
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")  # 1-based
            split.append(f"{image_id} {1 if k < 3 else 0}")
            boxes.append(f"{image_id} 4.0 3.0 20.0 10.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(classes)) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def test_loads_the_distributed_layout(tmp_path):
    root = make_tree(tmp_path / "CUB_200_2011")
    s = load_imageset(CUB200Params(root=str(root)), 32, use_cache=False)
    assert s.num_classes == 3 and s.class_names[0] == "001.Bird_0"
    assert len(s.train) == 9 and len(s.test) == 3
    assert s.train.images.shape == (9, 3, 32, 32) and s.train.images.dtype == np.uint8
    assert sorted(s.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 1-based ids -> 0..C-1
    # The first image (40x30 px, box x 4..24, y 3..13) lands in the 32x32 frame scaled.
    assert np.allclose(s.train.boxes[0, 0], [4 * 32 / 40, 3 * 32 / 30, 24 * 32 / 40, 13 * 32 / 30])


def test_missing_file_names_path_and_file(tmp_path):
    root = make_tree(tmp_path / "CUB_200_2011")
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DatasetError, match=r"expected train_test_split.txt under .*CUB_200_2011"):
        load_imageset(CUB200Params(root=str(root)), 32, use_cache=False)
    with pytest.raises(DatasetError, match="no folder at"):
        load_imageset(CUB200Params(root=str(tmp_path / "nowhere")), 32, use_cache=False)


def test_every_missing_or_corrupt_image_is_listed(tmp_path):
    root = make_tree(tmp_path / "CUB_200_2011")
    (root / "images" / "001.Bird_0" / "img_0.jpg").unlink()
    (root / "images" / "002.Bird_1" / "img_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError) as e:
        load_imageset(CUB200Params(root=str(root)), 32, use_cache=False)
    msg = str(e.value)
    assert "2 listed images could not be loaded" in msg
    assert "missing: " in msg and "001.Bird_0/img_0.jpg" in msg
    assert "cannot decode: " in msg and "002.Bird_1/img_1.jpg" in msg
