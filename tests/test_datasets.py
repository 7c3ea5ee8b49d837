"""Every real dataset family from a small fake tree in its exact distributed layout."""

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from harness.data import DATASETS, load_imageset
from harness.data._decode import DatasetError


def image(path, k=0, size=(40, 30)):
    """A tiny image; k cycles through RGB, grayscale, CMYK and a PNG saved under .jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = ["RGB", "L", "CMYK", "RGB"][k % 4]
    colour = {"RGB": (k * 30 % 255, 10, 200), "L": 128, "CMYK": (10, 20, 30, 0)}[mode]
    Image.new(mode, size, color=colour).save(path, format="PNG" if k % 4 == 3 else "JPEG")


def load(name, root, size=16, **kw):
    params = DATASETS.get(name).Params(root=str(root), **kw)
    return load_imageset(params, size, use_cache=False)


def test_fgvc_aircraft_levels_and_banner(tmp_path):
    root = tmp_path / "fgvc-aircraft-2013b"
    data = root / "data"
    variants = ["707-320", "A300B4", "Boeing 737"]  # names with spaces are split on the first space only
    families = ["Boeing 707", "A300"]
    splits = {"trainval": [("0000001", 0), ("0000002", 1), ("0000003", 2), ("0000004", 2)],
              "test": [("0000005", 0), ("0000006", 2)]}
    for k, (image_id, _) in enumerate(splits["trainval"] + splits["test"]):
        image(data / "images" / f"{image_id}.jpg", k, size=(60, 60))
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "families.txt").write_text("\n".join(families) + "\n")
    for split, rows in splits.items():
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {variants[c]}\n" for i, c in rows))
        (data / f"images_family_{split}.txt").write_text("".join(f"{i} {families[min(c, 1)]}\n" for i, c in rows))
    s = load("fgvc_aircraft", root)
    assert (s.num_classes, len(s.train), len(s.test)) == (3, 4, 2)
    assert s.train.labels.tolist() == [0, 1, 2, 2] and s.class_names[2] == "Boeing 737"
    fam = load("fgvc_aircraft", root, level="family")
    assert fam.num_classes == 2 and fam.test.labels.tolist() == [0, 1]
    banner = load("fgvc_aircraft", root, crop_banner=True)
    assert banner.train.images.shape == s.train.images.shape
    with pytest.raises(DatasetError, match="expected data/images_manufacturer_trainval.txt|manufacturers.txt"):
        load("fgvc_aircraft", root, level="manufacturer")


def test_stanford_dogs(tmp_path):
    root = tmp_path / "dogs"
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    lists = {"train": [(f"{breeds[0]}/a.jpg", 1), (f"{breeds[1]}/b.jpg", 2), (f"{breeds[1]}/c.jpg", 2)],
             "test": [(f"{breeds[0]}/d.jpg", 1)]}
    for k, (rel, _) in enumerate(lists["train"] + lists["test"]):
        image(root / "Images" / rel, k)
    for split, rows in lists.items():
        savemat(root / f"{split}_list.mat", {"file_list": np.array([[r] for r, _ in rows], dtype=object),
                                             "labels": np.array([[c] for _, c in rows])})
    s = load("stanford_dogs", root)
    assert (s.num_classes, len(s.train), len(s.test)) == (2, 3, 1)
    assert s.train.labels.tolist() == [0, 1, 1]  # labels are 1-based in the .mat files
    assert s.class_names == ["Chihuahua", "Japanese_spaniel"]


def test_nabirds_remaps_non_contiguous_ids(tmp_path):
    root = tmp_path / "nabirds"
    rows = [("uuid-a", "0295/a.jpg", 295, 1), ("uuid-b", "0296/b.jpg", 296, 1), ("uuid-c", "0817/c.jpg", 817, 0),
            ("uuid-d", "0295/d.jpg", 295, 0)]
    for k, (_, rel, _, _) in enumerate(rows):
        image(root / "images" / rel, k)
    (root / "images.txt").write_text("".join(f"{u} {r}\n" for u, r, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{u} {c}\n" for u, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{u} {t}\n" for u, _, _, t in rows))
    (root / "classes.txt").write_text("0 Birds\n295 Common Loon\n296 Pacific Loon\n817 Snowy Owl\n")
    (root / "hierarchy.txt").write_text("295 0\n296 0\n817 0\n")
    (root / "bounding_boxes.txt").write_text("".join(f"{u} 1 2 10 8\n" for u, _, _, _ in rows))
    s = load("nabirds", root)
    assert s.num_classes == 3 and s.class_names == ["Common Loon", "Pacific Loon", "Snowy Owl"]
    assert sorted(s.train.labels.tolist()) == [0, 1] and sorted(s.test.labels.tolist()) == [0, 2]
    assert s.meta["class_ids"] == [295, 296, 817] and s.train.boxes.shape == (2, 1, 4)


def test_imagefolder(tmp_path):
    for k, rel in enumerate(["train/cat/1.jpg", "train/cat/2.png", "train/dog/3.jpg", "val/dog/4.jpg"]):
        image(tmp_path / rel, k)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    s = load("imagefolder", tmp_path, test_dir="val")
    assert s.class_names == ["cat", "dog"] and len(s.train) == 3 and s.test.labels.tolist() == [1]
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DatasetError, match="classes not in"):
        load("imagefolder", tmp_path, test_dir="val")


def cars_annotations(rows, with_test_flag=False):
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class"] + (["test", "relative_im_path"] if with_test_flag
                                                                       else ["fname"])
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        arr[0, i] = tuple(np.array([[v]]) if not isinstance(v, str) else np.array([v]) for v in row)
    return arr


@pytest.mark.parametrize("test_annos_in_devkit", [False, True])
def test_stanford_cars_devkit_layout(tmp_path, test_annos_in_devkit):
    root = tmp_path / "cars"
    (root / "devkit").mkdir(parents=True)
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    train = [(1, 2, 30, 20, 1, "00001.jpg"), (1, 2, 30, 20, 2, "00002.jpg"), (1, 2, 30, 20, 2, "00003.jpg")]
    test = [(3, 4, 20, 20, 1, "00001.jpg")]
    for k, row in enumerate(train):
        image(root / "cars_train" / row[-1], k)
    image(root / "cars_test" / "00001.jpg", 1)
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": cars_annotations(train)})
    where = root / "devkit" if test_annos_in_devkit else root
    savemat(where / "cars_test_annos_withlabels.mat", {"annotations": cars_annotations(test)})
    s = load("stanford_cars", root, size=20)
    assert (s.num_classes, len(s.train), len(s.test)) == (2, 3, 1)
    assert s.train.labels.tolist() == [0, 1, 1] and s.meta["layout"] == "devkit"
    assert np.allclose(s.train.boxes[0, 0], [1 * 20 / 40, 2 * 20 / 30, 30 * 20 / 40, 20 * 20 / 30])


def test_stanford_cars_car_ims_layout(tmp_path):
    root = tmp_path / "cars"
    rows = [(1, 2, 30, 20, 1, 0, "car_ims/000001.jpg"), (1, 2, 30, 20, 2, 1, "car_ims/000002.jpg"),
            (1, 2, 30, 20, 2, 0, "car_ims/000003.jpg")]
    for k, row in enumerate(rows):
        image(root / row[-1], k)
    savemat(root / "cars_annos.mat", {"annotations": cars_annotations(rows, with_test_flag=True),
                                      "class_names": np.array([["A", "B"]], dtype=object)})
    s = load("stanford_cars", root)
    assert (len(s.train), len(s.test)) == (2, 1) and s.test.labels.tolist() == [1] and s.meta["layout"] == "car_ims"


def test_missing_trees_name_what_was_expected(tmp_path):
    for name in ("fgvc_aircraft", "stanford_dogs", "nabirds", "imagefolder", "stanford_cars", "cub200"):
        with pytest.raises(DatasetError, match="no folder at"):
            load(name, tmp_path / "nowhere")
    (tmp_path / "cars").mkdir()
    with pytest.raises(DatasetError, match="neither devkit/"):
        load("stanford_cars", tmp_path / "cars")


def test_check_cli(tmp_path, capsys):
    from harness.data.__main__ import main
    for k, rel in enumerate(["train/cat/1.jpg", "train/dog/2.jpg", "test/dog/3.jpg"]):
        image(tmp_path / rel, k)
    assert main(["check", "imagefolder", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and "train       2 images" in out and "test        1 images" in out
    (tmp_path / "test" / "dog" / "4.jpg").write_bytes(b"broken")
    (tmp_path / "test" / "dog" / "5.jpg").write_bytes(b"broken too")
    assert main(["check", "imagefolder", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "2 listed images could not be loaded" in err and "4.jpg" in err and "5.jpg" in err
    assert main(["check", "imagefoldr", str(tmp_path)]) == 2
    assert "did you mean 'imagefolder'" in capsys.readouterr().err


def test_cache_reused_and_rebuilt_when_the_tree_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FGVC_HARNESS_CACHE", str(tmp_path / "cache"))
    for k, rel in enumerate(["train/cat/1.jpg", "train/dog/2.jpg", "test/dog/3.jpg"]):
        image(tmp_path / "tree" / rel, k)
    params = DATASETS.get("imagefolder").Params(root=str(tmp_path / "tree"))
    first = load_imageset(params, 16)
    import harness.data.imagefolder as imagefolder
    calls = []
    original = imagefolder.ImageFolder.build.__func__
    monkeypatch.setattr(imagefolder.ImageFolder, "build",
                        classmethod(lambda cls, p, s: (calls.append(1), original(cls, p, s))[1]))
    assert np.array_equal(load_imageset(params, 16).train.images, first.train.images) and calls == []
    image(tmp_path / "tree" / "train" / "cat" / "4.jpg", 1)  # the source changed: decode again
    assert len(load_imageset(params, 16).train) == 3 and calls == [1]
