"""The one image reader (lesa.data.images) and the one folder listing (lesa.data.imagefolder)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import image_folder
from PIL import Image

from lesa.data import (
    TolerantImageFolder,
    check_image_folder,
    collate_skipping_bad,
    list_image_folder,
    read_image,
    read_label_map,
)
from lesa.detection.visualize import load_image
from lesa.errors import BadImageError, DataError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noise(size=(16, 12), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def folder(root: Path, classes=("cat", "dog"), n=2, ext=".png") -> Path:
    for c in classes:
        for i in range(n):
            save(noise(seed=i), root / c / f"{i}{ext}")
    return root


def make_split(root: Path) -> None:
    for split in ("train", "val"):
        folder(root / split)


# --- the folder listing ---------------------------------------------------------------------------------------

def test_hidden_folders_and_files_are_neither_classes_nor_samples(tmp_path):
    make_split(tmp_path)
    folder(tmp_path / "train", classes=(".ipynb_checkpoints",))  # sorts first: torchvision would make it class 0
    save(noise(), tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png")
    save(noise(), tmp_path / "train" / "dog" / "._0.png")  # macOS resource fork
    assert check_image_folder(tmp_path) == ["cat", "dog"]
    dataset = TolerantImageFolder(tmp_path / "train")
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    for path, target in dataset.samples:
        assert Path(path).parent.name == dataset.classes[target] and not Path(path).name.startswith(".")
    assert sorted(dataset.targets) == [0, 0, 1, 1]


def test_every_extension_pil_opens_counts(tmp_path):
    folder(tmp_path, classes=("cat",), ext=".jfif")  # JPEG's other extension, unknown to torchvision
    folder(tmp_path, classes=("dog",), ext=".WEBP")
    dataset = TolerantImageFolder(tmp_path)
    assert sorted(dataset.targets) == [0, 0, 1, 1]
    image, target = dataset[0]
    assert target == 0 and image.mode == "RGB" and image.size == (16, 12)


def test_a_class_without_images_is_an_error_naming_it(tmp_path):
    folder(tmp_path, classes=("cat",))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "0.heic").write_bytes(b"x")
    with pytest.raises(DataError, match=r"class folder '.*dog' has no images \(it holds 1 \.heic"):
        list_image_folder(tmp_path)


def test_symlink_loops_are_listed_once_and_end(tmp_path):
    folder(tmp_path, n=1)
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")  # cat/loop/loop/... would never end
    extra = folder(tmp_path / "elsewhere", classes=("more",), n=2) / "more"
    os.symlink(extra, tmp_path / "dog" / "extra")  # a linked folder outside is followed
    listing = list_image_folder(tmp_path)
    assert listing.classes == ["cat", "dog", "elsewhere"]
    cats = [p for p, t in listing.samples if t == 0]
    dogs = [p for p, t in listing.samples if t == 1]
    assert [Path(p).name for p in cats] == ["0.png"]
    assert sorted(Path(p).name for p in dogs) == ["0.png", "0.png", "1.png"]


def test_a_symlink_back_up_from_a_class_folder_is_not_followed(tmp_path):
    data = image_folder(tmp_path / "d", classes=("a", "b"), n=3, size=(12, 12))
    (data / "train" / "a" / "loop").symlink_to("..")
    listing = list_image_folder(data / "train")
    assert len(listing.samples) == 6 and [t for _, t in listing.samples].count(0) == 3


# --- the image reader ----------------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # red left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(stored, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    rgb = np.asarray(read_image(path)).astype(int)
    assert rgb.shape == (40, 20, 3)  # upright: portrait
    assert np.abs(rgb[5, 10] - RED).max() < 30 and np.abs(rgb[35, 10] - BLUE).max() < 30  # left went to the top
    assert load_image(path).shape == (3, 40, 20)


def ramp16(low=0, high=65535, shape=(8, 32)) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).reshape(shape).astype(np.uint16)


def mode_image(mode: str) -> Image.Image:
    """A non-constant 8x32 image in ``mode``."""
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (8, 1))
    if mode in ("I;16", "I;16B"):
        return Image.frombytes(mode, (32, 8), ramp16().astype("<u2" if mode == "I;16" else ">u2").tobytes())
    if mode == "I":
        return Image.fromarray(ramp.astype(np.int32) * 100_000 - 2_000_000)  # beyond 16 bits, negative too
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32) / 1000.0)  # 0 .. 0.248
    rgb = np.stack([ramp, ramp, 255 - ramp], axis=-1)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, np.full_like(ramp, 255)]), mode="RGBA")
    return Image.fromarray(rgb).convert(mode)


@pytest.mark.parametrize("mode,ext", [("1", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGB", "png"),
                                      ("RGBA", "png"), ("CMYK", "jpg"), ("I;16", "png"), ("I;16B", "tif"),
                                      ("I", "tif"), ("F", "tif")])
def test_every_mode_reads_as_8_bit_rgb_with_contrast(tmp_path, mode, ext):
    path = save(mode_image(mode), tmp_path / f"image.{ext}")
    assert Image.open(path).mode == mode  # the file really holds that mode
    rgb = np.asarray(read_image(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (8, 32, 3)
    assert rgb.max() - rgb.min() > 100  # contrast kept, nothing saturated to one value
    if mode in ("I;16", "I;16B", "I", "F"):  # grey ramps: monotonic, the whole 8-bit range
        grey = rgb[..., 0].ravel()
        assert (rgb[..., 0] == rgb[..., 2]).all() and (np.diff(grey) >= 0).all()
        assert grey[0] == 0 and grey[-1] == 255


def test_16_bit_images_keep_their_contrast(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    rgb = np.asarray(read_image(str(tmp_path / "ramp.png")))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) == 256  # not clipped to black and white
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)


def test_16_bit_images_scale_from_their_own_range(tmp_path):
    narrow = save(Image.fromarray(ramp16(1000, 1100)), tmp_path / "narrow.png")  # /257 would make it one grey
    grey = np.asarray(read_image(narrow))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    flat = save(Image.fromarray(np.full((8, 8), 40000, np.uint16)), tmp_path / "flat.png")
    assert len(np.unique(np.asarray(read_image(flat)))) == 1
    # det predict reads through the same reader: no saturation to white
    full = save(Image.fromarray(ramp16()), tmp_path / "full.png")
    assert len(torch.unique(load_image(full))) > 200


def test_transparency_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 8, 4), np.uint8)
    rgba[..., :3] = 200  # light grey everywhere ...
    rgba[:, :4, 3] = 255  # ... opaque on the left, transparent on the right
    rgb = np.asarray(read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert (rgb[:, :4] == 200).all() and (rgb[:, 4:] == 0).all()
    palette = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) % 2, (4, 1)), mode="P")
    palette.putpalette([255, 255, 255] * 256)
    path = save(palette, tmp_path / "p.png", transparency=1)  # index 1 transparent
    assert np.asarray(read_image(path))[0, :4].tolist() == [[255] * 3, [0] * 3, [255] * 3, [0] * 3]


def test_label_maps_keep_their_indices(tmp_path):
    ids = np.tile(np.arange(4, dtype=np.uint8), (3, 1))
    palette = Image.fromarray(ids, mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250] + [0] * 756)  # colours unlike the ids
    labels = read_label_map(save(palette, tmp_path / "p.png"))
    assert labels.dtype == np.int64 and (labels == ids).all()
    values = np.array([[0, 255, 300, 1000]], np.uint16)  # 16-bit ids above 255 stay themselves
    assert (read_label_map(save(Image.fromarray(values), tmp_path / "i16.png")) == values).all()


def test_rgb_label_maps_are_refused(tmp_path):
    path = save(Image.new("RGB", (4, 4)), tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png has 3 channels .* must be single-channel"):
        read_label_map(path)


# --- bad images ----------------------------------------------------------------------------------------------

def truncated(tmp_path: Path) -> Path:
    path = save(noise((64, 64)), tmp_path / "truncated.jpg")
    path.write_bytes(path.read_bytes()[:600])
    return path


@pytest.mark.parametrize("pixels", [12 * 12, 20 * 20])  # PIL warns above the limit, errors above twice it
def test_decompression_bombs_are_bad_images(tmp_path, monkeypatch, pixels):
    side = int(pixels ** 0.5)
    path = save(noise((side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImageError, match=rf"bomb\.png cannot be read: {pixels} pixels, more than .* = 100 "):
        read_image(path)


def test_truncated_and_undecodable_files_are_bad_images(tmp_path):
    with pytest.raises(BadImageError, match=r"truncated\.jpg cannot be read: OSError: .*(?i:truncated)"):
        read_image(truncated(tmp_path))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImageError, match=r"text\.png cannot be read"):
        read_image(tmp_path / "text.png")


def test_class_folders_skip_and_count_bad_images(tmp_path, monkeypatch):
    folder(tmp_path, n=1)
    save(noise((20, 20)), tmp_path / "cat" / "bomb.png")
    truncated(tmp_path / "dog")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # the 16x12 images pass, the 20x20 one is a bomb
    dataset = TolerantImageFolder(tmp_path, transform=lambda image: torch.zeros(1))
    assert len(dataset) == 4  # listed; refused only when read
    with pytest.warns(UserWarning, match="skipping undecodable image") as caught:
        batch = [dataset[i] for i in range(len(dataset))]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "bomb.png" in messages[0] and "truncated.jpg" in messages[1]
    _, targets, bad = collate_skipping_bad(batch)
    assert bad == 2 and targets.tolist() == [0, 1]


def test_coco_images_and_semantic_maps_use_the_reader(tmp_path):
    pytest.importorskip("pycocotools")
    from lesa.data.coco import CocoDetection

    save(Image.fromarray(ramp16(shape=(20, 30))), tmp_path / "img" / "a.png")
    labels = Image.fromarray(np.full((20, 30), 2, np.uint8), mode="P")
    labels.putpalette([0, 0, 0, 9, 9, 9, 200, 100, 50] + [0] * 759)
    save(labels, tmp_path / "sem" / "a.png")
    coco = dict(images=[dict(id=1, file_name="a.png", width=30, height=20)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[2, 2, 10, 10], area=100, iscrowd=0,
                                  segmentation=[[2, 2, 12, 2, 12, 12, 2, 12]])],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "a.json").write_text(json.dumps(coco))
    image, target = CocoDetection(tmp_path / "a.json", tmp_path / "img", semantic=tmp_path / "sem")[0]
    assert image.min() == 0 and image.max() == 1 and len(torch.unique(image)) > 200  # not saturated
    assert (target["semantic"] == 2).all()
