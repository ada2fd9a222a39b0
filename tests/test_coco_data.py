"""COCO files met as users write them: validated as a whole when loaded (schema, ids, polygons, RLE sizes, boxes,
areas, image sizes and EXIF orientation, semantic maps) and by ``det train`` before any training, box-only data,
one category mapping per run, COCO stats without detections, no epoch lost to a failing evaluation, and
``det predict`` past unreadable inputs."""
import json

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from lesa.cli import main
from lesa.data.coco import CocoDetection, encode_mask, hflip, rle_counts
from lesa.data.digit_scenes import ensure_digit_scenes
from lesa.detection.evaluate import coco_evaluate, to_coco_results
from lesa.errors import BadImageError, DataError

pytest.importorskip("pycocotools")

CATEGORIES = [dict(id=3, name="three"), dict(id=7, name="seven"), dict(id=9, name="nine")]


def box(ann_id, image_id=1, category_id=3, bbox=(4, 4, 10, 8), **extra):
    return dict(id=ann_id, image_id=image_id, category_id=category_id, bbox=list(bbox), iscrowd=0, **extra)


def square(x, y, side=8):
    return [[x, y, x + side, y, x + side, y + side, x, y + side]]


def write_image(path, size=(32, 32), orientation=None, array=None):
    """A PNG (``size`` = stored width x height), optionally EXIF-oriented; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = (np.arange(size[0] * size[1] * 3) % 251).astype(np.uint8).reshape(size[1], size[0], 3)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)
    return array


def write_coco(tmp_path, annotations, images=None, categories=CATEGORIES, name="ann.json", sizes=None):
    """``name`` with ``annotations`` over 32x32 images 1 and 2 (or ``images``) written to tmp_path/img."""
    if images is None:
        images = [dict(id=i, file_name=f"{i}.png", width=32, height=32) for i in (1, 2)]
    for info in images:
        if "file_name" in info and not (tmp_path / "img" / info["file_name"]).exists():
            write_image(tmp_path / "img" / info["file_name"], (sizes or {}).get(info["id"], (32, 32)))
    path = tmp_path / name
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def load(tmp_path, annotations, **kw):
    return CocoDetection(write_coco(tmp_path, annotations), tmp_path / "img", **kw)


def refused(tmp_path, annotations=None, match=None, path=None, **kw):
    with pytest.raises(DataError, match=match) as info:
        CocoDetection(path or write_coco(tmp_path, annotations), tmp_path / "img", **kw)
    message = str(info.value)
    assert "\n" not in message and "ann.json" in message
    return message


# -- the schema ---------------------------------------------------------------------------------------------
def test_a_top_level_list_is_one_line(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([box(1)]))
    (tmp_path / "img").mkdir()
    assert "the top level is a list, not a mapping" in refused(tmp_path, path=path)


def test_an_image_without_file_name(tmp_path):
    images = [dict(id=1, file_name="1.png", width=32, height=32), dict(id=5, width=32, height=32)]
    message = refused(tmp_path, path=write_coco(tmp_path, [box(1)], images=images))
    assert "image 5 has no 'file_name'; every image needs id, file_name, width and height" in message


@pytest.mark.parametrize("bbox,expected", [(["4", 4, 10, 8], "bbox[0]: got '4'; give a number"),
                                           ([4, 4, 10], "bbox: got [4, 4, 10]"),
                                           ([4, 4, -10, 8], "negative width or height")])
def test_bad_boxes_name_the_annotation(tmp_path, bbox, expected):
    message = refused(tmp_path, [box(1), box(12, image_id=2, bbox=bbox)])
    assert "annotation 12 (image 2)" in message and expected in message


@pytest.mark.parametrize("section,match", [("images", "image id 1 is used more than once"),
                                           ("annotations", "annotation id 1 is used more than once"),
                                           ("categories", "category id 3 is used more than once")])
def test_ids_are_unique(tmp_path, section, match):
    data = dict(images=[dict(id=i, file_name=f"{i}.png", width=32, height=32) for i in (1, 2)],
                annotations=[box(1), box(2)], categories=list(CATEGORIES))
    data[section][1] = dict(data[section][1], id=data[section][0]["id"])
    refused(tmp_path, match=match, path=write_coco(tmp_path, **data))


# -- masks, polygons, RLE -----------------------------------------------------------------------------------
def test_box_only_annotations_load_without_masks(tmp_path):
    data = load(tmp_path, [box(1), box(2, category_id=7, bbox=(10, 12, 6, 6))], train=True, flip=0.0)
    assert not data.has_masks and "(box-only)" in data.summary
    image, target = data[0]
    assert "masks" not in target and target["labels"].tolist() == [1, 2]
    _, flipped = hflip(image, target)
    assert flipped["boxes"][0].tolist() == [18.0, 4.0, 28.0, 12.0]
    refused(tmp_path, [box(1), box(2, segmentation=square(1, 1))], match="1 of 2 annotations have no 'segmentation'")


@pytest.mark.parametrize("empty", [[], None])
def test_empty_or_null_segmentations_are_box_only(tmp_path, empty):
    """``segmentation: []`` / ``null`` on every annotation (VOC / YOLO converters) is box-only data; a mixture of
    such annotations with masked ones is refused."""
    data = load(tmp_path, [box(1, segmentation=empty), box(2, image_id=2, segmentation=empty)], train=True)
    assert not data.has_masks and "(box-only)" in data.summary and not data.repairs.counts
    assert "masks" not in data[0][1] and len(data.coco.getAnnIds()) == 2
    message = refused(tmp_path, [box(1, segmentation=square(4, 4)), box(7, image_id=2, segmentation=empty)])
    assert "1 of 2 annotations have no 'segmentation' (or an empty one: null or []; e.g. annotation 7 (image 2)" \
        in message and "give every annotation a mask, or none" in message


def test_short_polygons_are_dropped_and_counted(tmp_path):
    anns = [box(1, segmentation=square(4, 4) + [[1, 1, 5, 5]]),  # a good square and a 2-point polygon: kept
            box(2, segmentation=[[1, 1]]),  # a 1-point polygon only: the annotation goes
            box(3, segmentation=square(20, 20))]
    data = load(tmp_path, anns, max_repaired=1.0)
    assert data.repairs.counts == {"polygons_dropped": 2, "no_polygon_left": 1}
    assert "2 polygon(s) with fewer than 3 points dropped, 1 annotation(s) left without a polygon dropped" \
        in data.summary
    assert [a["id"] for a in data.coco.loadAnns(data.coco.getAnnIds())] == [1, 3]
    _, target = data[0]
    assert target["masks"].shape == (2, 32, 32) and target["masks"][0].sum() >= 64
    refused(tmp_path, anns, match=r"2 of 3 annotations \(66.7%\) needed repair .* more than the 1% allowed")


def test_an_rle_of_another_size_is_refused(tmp_path):
    mask = np.zeros((20, 32), np.uint8)
    message = refused(tmp_path, [box(1, segmentation=encode_mask(np.zeros((32, 32), np.uint8))),
                                 box(4, image_id=2, segmentation=encode_mask(mask))])
    assert "annotation 4 (image 2): its RLE mask has size [20, 32]" in message and "32x32" in message


def test_compressed_rles_are_decoded_when_loaded(tmp_path):
    """A compressed RLE that is not valid, or decodes to fewer or more pixels than its image, is refused when the
    file loads, naming the annotation (was: pycocotools' ValueError in training, or a mask of uninitialised
    memory); a valid one loads as the mask it encodes."""
    rng = np.random.default_rng(0)
    for shape in [(32, 32), (7, 5), (48, 64), (1, 1)]:  # the parser agrees with pycocotools' encoder
        for fill in (0.0, 0.3, 1.0):
            mask = (rng.random(shape) < fill).astype(np.uint8)
            counts = rle_counts(encode_mask(mask)["counts"])
            assert sum(counts) == mask.size and counts == runs(mask)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:14] = 1
    data = load(tmp_path, [box(1, segmentation=encode_mask(mask))])
    assert torch.equal(data[0][1]["masks"][0], torch.from_numpy(mask))
    too_many = encode_mask(np.ones((32, 33), np.uint8))["counts"]
    for counts, expected in [("@@bad", "its RLE counts '@@bad' are not COCO's compressed RLE (run 0 is negative"),
                             ("ab~~", "(character '~' is outside '0'..'o')"),
                             ("0", "its compressed RLE decodes to 0 pixels, not the image's 32 x 32 = 1024"),
                             (too_many, "its compressed RLE decodes to 1056 pixels"),
                             ("1b", "(it ends inside a number)")]:
        message = refused(tmp_path, [box(1, segmentation=square(4, 4)),
                                     box(4, image_id=2, segmentation=dict(size=[32, 32], counts=counts))],
                          max_repaired=1.0)
        assert "annotation 4 (image 2): " in message and expected in message, message


def runs(mask):
    """The column-major run lengths of a binary mask, starting with zeros (COCO's RLE)."""
    flat = mask.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    lengths = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *lengths] if flat[0] else lengths


def test_polygons_far_outside_are_clipped_or_dropped_and_counted(tmp_path):
    """Coordinates of 1e9 / -1e12 (was: a segfault / memory exhausted in pycocotools) are clipped to the image;
    a polygon wholly outside (was: a 0-pixel mask, trained silently) is dropped and counted, with its annotation
    when nothing is left; an absurd coordinate drops its polygon."""
    anns = [box(1, bbox=(0, 0, 32, 32), segmentation=[[0, 0, 1e9, 0, 1e9, 1e9]]),  # the triangle below the diagonal
            box(2, bbox=(0, 0, 16, 16), segmentation=[[-1e12, -1e12, 16, 0, 0, 16]]),
            box(3, bbox=(4, 4, 8, 8), segmentation=square(4, 4) + square(40, 40)),  # one of two outside
            box(4, image_id=2, bbox=(4, 4, 8, 8), segmentation=square(100, 4)),  # its only polygon outside
            box(5, image_id=2, bbox=(4, 4, 8, 8), segmentation=square(4, 4) + [[0, 0, 8, 0, 4, 1e13]])]
    data = load(tmp_path, anns, max_repaired=1.0)
    assert data.repairs.counts == {"polygons_outside": 2, "no_polygon_left": 1, "polygons_absurd": 1}
    assert "2 polygon(s) wholly outside their image dropped" in data.summary
    assert "1 polygon(s) with a coordinate beyond 1e+12 pixels dropped" in data.summary
    assert [a["id"] for a in data.coco.loadAnns(data.coco.getAnnIds())] == [1, 2, 3, 5]
    masks = data[0][1]["masks"]
    assert abs(int(masks[0].sum()) - 32 * 33 // 2) <= 32 and masks[0][20, 30] and not masks[0][30, 20]
    assert abs(int(masks[1].sum()) - 16 * 16 // 2) <= 16
    assert int(masks[2].sum()) >= 64
    assert max(abs(v) for polygon in data.coco.anns[1]["segmentation"] for v in polygon) <= 32
    message = refused(tmp_path, anns[3:4] + [box(i, image_id=2, segmentation=square(4, 4)) for i in range(6, 10)])
    assert "1 of 5 annotations (20.0%) needed repair (1 polygon(s) wholly outside their image dropped, 1 " \
        "annotation(s) left without a polygon dropped; e.g. annotation 4 (image 2): polygon 0 spans x 100..108" \
        in message
    assert "allow more with --max-repaired FRACTION" in message


# -- boxes ---------------------------------------------------------------------------------------------------
def test_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    anns = [box(1, bbox=(-5, 4, 10, 8)),  # 5 px outside: clipped
            box(2, bbox=(40, 40, 5, 5)),  # wholly outside: dropped
            box(3, bbox=(31.8, 4, 3, 8)),  # 0.2 px left after clipping: dropped
            box(4, bbox=(24, 24, 8.5, 8))]  # 0.5 px over: clipped without counting
    data = load(tmp_path, anns, max_repaired=1.0)
    assert data.repairs.counts == {"boxes_clipped": 1, "boxes_outside": 1, "boxes_empty": 1}
    _, target = data[0]
    assert target["boxes"].tolist() == [[0, 4, 5, 12], [24, 24, 32, 32]]
    message = refused(tmp_path, anns)
    assert "3 of 4 annotations" in message
    assert "e.g. annotation 1 (image 1): bbox [-5.0, 4.0, 10.0, 8.0] on a 32x32 image" in message


def test_coco_area_zero_is_the_boxs_area(tmp_path):
    from lesa.data.coco import Repairs, clean_annotation

    ann = dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 50, 40], area=0, iscrowd=0)
    cleaned = clean_annotation(ann, dict(id=1, width=100, height=100), tmp_path / "a.json", Repairs())
    assert cleaned["area"] == 2000


def test_a_few_repairs_in_a_large_file_are_fine(tmp_path):
    anns = [box(i, image_id=1 + i % 2, bbox=(i % 20, 3, 6, 6)) for i in range(1, 201)]
    anns[0]["bbox"] = [100, 100, 4, 4]
    anns[1]["bbox"] = [-3, 3, 6, 6]
    data = load(tmp_path, anns)  # 2 of 200: within 1%
    assert len(data.coco.getAnnIds()) == 199 and "(2 annotations)" in data.summary
    anns[2]["bbox"] = [-3, 3, 6, 6]
    refused(tmp_path, anns, match="3 of 200 annotations")


# -- image sizes and EXIF orientation ------------------------------------------------------------------------
def exif_dataset(tmp_path, json_size):
    """A 32x20 PNG stored with EXIF orientation 6 (upright: 20x32); the JSON says ``json_size``."""
    pixels = write_image(tmp_path / "img" / "1.png", (32, 20), orientation=6)
    images = [dict(id=1, file_name="1.png", width=json_size[0], height=json_size[1])]
    return pixels, write_coco(tmp_path, [box(1, bbox=(2, 2, 10, 10))], images=images)


def test_exif_rotated_images_are_read_upright_when_annotated_upright(tmp_path):
    pixels, path = exif_dataset(tmp_path, (20, 32))
    data = CocoDetection(path, tmp_path / "img")
    image, _ = data[0]
    assert image.shape == (3, 32, 20) and not data.stored
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(np.rot90(pixels, -1).copy()).permute(2, 0, 1))


def test_exif_rotated_images_annotated_on_the_stored_pixels_are_read_as_stored(tmp_path):
    pixels, path = exif_dataset(tmp_path, (32, 20))
    data = CocoDetection(path, tmp_path / "img")
    image, _ = data[0]
    assert data.stored == {1: 6} and "1 image(s) read as stored, without their EXIF rotation" in data.summary
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(pixels).permute(2, 0, 1))


def test_an_image_of_neither_size_is_refused(tmp_path):
    _, path = exif_dataset(tmp_path, (30, 30))
    message = refused(tmp_path, path=path)
    assert "image 1 (" in message
    assert "is 32x20 (20x32 upright, by its EXIF orientation) but 30x30 in the JSON (width x height)" in message


@pytest.mark.parametrize("file_name,expected", [
    ("sub", "image 2: file_name 'sub' is a folder in {img}, not an image file"),
    ("train/2.png", "e.g. image 2: 'train/2.png'); file_names are relative to that image folder; '2.png' exists "
                    "there: strip the prefix 'train/' in every file_name"),
    ("sub\\2.png", "'sub/2.png' exists there: write '/' for '\\' in every file_name"),
    ("none.png", "1 image file(s) listed there are missing from {img} (e.g. image 2: 'none.png'); file_names are "
                 "relative to that image folder; otherwise copy the files there"),
])
def test_a_missing_image_file_says_why(tmp_path, file_name, expected):
    write_image(tmp_path / "img" / "2.png")
    write_image(tmp_path / "img" / "sub" / "2.png")
    write_image(tmp_path / "img" / "1.png")
    images = [dict(id=1, file_name="1.png", width=32, height=32), dict(id=2, file_name=file_name, width=32, height=32)]
    path = tmp_path / "ann.json"  # not write_coco, which would write the missing file
    path.write_text(json.dumps(dict(images=images, annotations=[box(1)], categories=CATEGORIES)))
    message = refused(tmp_path, path=path)
    assert expected.format(img=tmp_path / "img") in message, message


def test_an_undecodable_image_is_named_at_load(tmp_path):
    path = write_coco(tmp_path, [box(1)])
    (tmp_path / "img" / "2.png").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match="2.png cannot be read: PIL cannot identify it"):
        CocoDetection(path, tmp_path / "img")


# -- HTC's semantic maps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("labels,classes,match", [
    ([0, 4, 255], 5, None),
    ([0, 200], None, r"semantic map .*1.png has label 200, outside \[0, 183\) and not 255 .*--semantic-classes 201"),
    ([0, 5], 5, r"has label 5, outside \[0, 5\) .* --semantic-classes 6"),
])
def test_semantic_labels_are_in_range_or_ignored(tmp_path, labels, classes, match):
    values = np.array(labels * (32 * 32 // len(labels) + 1), np.uint8)[: 32 * 32].reshape(32, 32)
    (tmp_path / "sem").mkdir()
    for i in (1, 2):
        Image.fromarray(values).save(tmp_path / "sem" / f"{i}.png")
    data = load(tmp_path, [box(1), box(2, image_id=2)], semantic=tmp_path / "sem", semantic_classes=classes)
    if match is None:
        assert set(data[0][1]["semantic"].unique().tolist()) == set(labels)
        return
    with pytest.raises(DataError, match=match):
        data[0]
    Image.new("RGB", (32, 32)).save(tmp_path / "sem" / "1.png")
    with pytest.raises(DataError, match="has 3 channels"):
        data[0]


def test_semantic_maps_follow_the_image_paths(tmp_path):
    """Images ``a/x.png`` and ``b/x.png`` read ``MAPS/a/x.png`` and ``MAPS/b/x.png`` (was: both ``MAPS/x.png``); a
    missing map is an error when the file loads, naming the image and the map; maps that would collide too."""
    images = [dict(id=1, file_name="a/x.png", width=32, height=32), dict(id=2, file_name="b/x.png", width=32,
                                                                         height=32)]
    path = write_coco(tmp_path, [box(1), box(2, image_id=2)], images=images)
    for folder, label in (("a", 1), ("b", 2)):
        (tmp_path / "sem" / folder).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), label, np.uint8)).save(tmp_path / "sem" / folder / "x.png")
    data = CocoDetection(path, tmp_path / "img", semantic=tmp_path / "sem", semantic_classes=3)
    assert [data[i][1]["semantic"].unique().tolist() for i in (0, 1)] == [[1], [2]]
    (tmp_path / "sem" / "b" / "x.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "sem" / "x.png")  # the old, flat match
    message = refused(tmp_path, path=path, semantic=tmp_path / "sem")
    assert f"1 of 2 semantic map(s) are missing from {tmp_path / 'sem'} (e.g. image 2 ('b/x.png'): " \
           f"{tmp_path / 'sem' / 'b' / 'x.png'}); each image's map is its path relative to" in message
    write_image(tmp_path / "img" / "a" / "x.jpg")
    images[1]["file_name"] = "a/x.jpg"
    message = refused(tmp_path, path=write_coco(tmp_path, [box(1), box(2, image_id=2)], images=images),
                      semantic=tmp_path / "sem")
    assert "images 1 ('a/x.png') and 2 ('a/x.jpg') would read the same semantic map" in message


def test_the_semantic_classes_flag(tmp_path, capsys):
    from lesa.cli import build_parser, det_options

    args = build_parser().parse_args(["det", "train", "--detector", "htc", "--semantic-root", "instances",
                                      "--semantic-classes", "12"])
    assert det_options(args).semantic_classes == 12
    assert main(["det", "train", "--semantic-classes", "4", "--output", str(tmp_path / "r"), "--quiet"]) == 2
    assert "--semantic-classes sets the classes of HTC's semantic branch, which is off" in capsys.readouterr().err


# -- categories and evaluation ---------------------------------------------------------------------------------
def test_other_files_are_read_through_the_run_categories(tmp_path):
    train = load(tmp_path, [box(1), box(2, category_id=7), box(3, image_id=2, category_id=9)])
    run = train.categories
    assert run == [dict(id=3, name="three"), dict(id=7, name="seven"), dict(id=9, name="nine")]
    subset = [dict(id=9, name="nine"), dict(id=7, name="seven")]  # a subset, in another order
    val = CocoDetection(write_coco(tmp_path, [box(1, category_id=9)], categories=subset, name="val.json"),
                        tmp_path / "img", categories=run)
    assert val.classes == train.classes and val[0][1]["labels"].tolist() == [3]
    # a detection of a category the file lacks maps to the run's id, not an IndexError
    prediction = dict(boxes=torch.tensor([[4.0, 4, 14, 12], [0, 0, 5, 5]]), labels=torch.tensor([3, 1]),
                      scores=torch.tensor([0.9, 0.8]))
    bbox, _ = to_coco_results(val, 1, prediction)
    assert [r["category_id"] for r in bbox] == [9, 3]
    stats = coco_evaluate(val, {"bbox": bbox})
    assert stats["bbox"]["AP"] == pytest.approx(100) and "segm" not in stats  # box-only: no mask AP
    for categories, match in (([dict(id=4, name="four")], "category 4 'four' is not one of the run's"),
                              ([dict(id=7, name="eight")], "category 7 is 'eight' there but 'seven' in the run")):
        path = write_coco(tmp_path, [box(1, category_id=categories[0]["id"])], categories=categories, name="ann.json")
        message = refused(tmp_path, path=path, categories=run)
        assert match in message and "3 'three', 7 'seven', 9 'nine'" in message


def test_a_category_no_annotation_uses_is_ignored(tmp_path):
    """A val file listing a category the run does not know is fine while no annotation uses it (said in the
    summary); once one does, it is refused."""
    run = load(tmp_path, [box(1), box(2, category_id=7)]).categories
    listed = [*CATEGORIES, dict(id=4, name="four")]
    path = write_coco(tmp_path, [box(1, category_id=7)], categories=listed, name="val.json")
    val = CocoDetection(path, tmp_path / "img", categories=run)
    assert val.categories == run and val[0][1]["labels"].tolist() == [2]
    assert "ignored 1 category(ies) that the run does not know and no annotation uses (4 'four')" in val.summary
    path = write_coco(tmp_path, [box(1, category_id=4)], categories=listed)
    assert "category 4 'four' is not one of the run's" in refused(tmp_path, path=path, categories=run)


def test_stats_are_none_exactly_where_a_size_range_has_no_ground_truth(tmp_path):
    data = load(tmp_path, [box(1, bbox=(4, 4, 10, 8), area=80.0, segmentation=square(4, 4)),
                           box(2, image_id=2, bbox=(0, 0, 32, 32), area=1024.0, segmentation=square(0, 0, 32))])
    none = coco_evaluate(data, {"bbox": [], "segm": []})
    for stats in none.values():  # small (80 px) and medium (1024 px) ground truth, no large
        assert stats == dict(AP=0.0, AP50=0.0, AP75=0.0, APs=0.0, APm=0.0, APl=None)
    assert coco_evaluate(data, {"bbox": []}, image_ids=[1])["bbox"]["APm"] is None
    one = dict(image_id=1, category_id=3, bbox=[4, 4, 10, 8], score=0.9)
    assert coco_evaluate(data, {"bbox": [one]})["bbox"]["APl"] is None  # the same rule with detections


# -- the commands ---------------------------------------------------------------------------------------------
def coco_root(tmp_path):
    """train: 3 images (an EXIF-rotated JPEG, a 16-bit PNG) and 3 categories; val: 2 of them, in another order."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_image(root / "train" / "a.jpg", (48, 32), orientation=6)  # upright 32x48
    Image.fromarray((rng.random((32, 32)) * 60000).astype(np.uint16)).save(root / "train" / "b.png")
    write_image(root / "train" / "c.png")
    write_image(root / "val" / "v.png")
    masks = dict(segmentation=square(4, 4, 12))
    train = dict(images=[dict(id=1, file_name="a.jpg", width=32, height=48),
                         dict(id=2, file_name="b.png", width=32, height=32),
                         dict(id=3, file_name="c.png", width=32, height=32)],
                 annotations=[box(i, image_id=1 + i % 3, category_id=(3, 7, 9)[i % 3], bbox=(4, 4, 12, 12), **masks)
                              for i in range(1, 7)], categories=CATEGORIES)
    val = dict(images=[dict(id=1, file_name="v.png", width=32, height=32)],
               annotations=[box(1, category_id=7, bbox=(4, 4, 12, 12), **masks)],
               categories=[CATEGORIES[2], CATEGORIES[1]])
    for name, data in (("train", train), ("val", val)):
        (root / f"{name}.json").write_text(json.dumps(data))
    (tmp_path / "small.yaml").write_text("box_batch_size_per_image: 32\nrpn_post_nms_top_n_train: 100\n")
    return root


@pytest.mark.parametrize("fault,message", [
    ("missing_image", "image file(s) listed there are missing"),
    ("mask_missing", "while the others have masks"),
    ("odd_polygon", "an odd count"),
    ("unknown_category", "has category_id 99, which is not among the categories"),
])
def test_coco_annotations_are_validated_before_training(tmp_path, fault, message):
    root = ensure_digit_scenes(tmp_path / "scenes", counts={"train": 2, "val": 1})
    annotations = json.loads((root / "train.json").read_text())
    ann = annotations["annotations"][0]
    if fault == "missing_image":
        (root / "train" / annotations["images"][0]["file_name"]).unlink()
    elif fault == "mask_missing":
        ann["segmentation"] = []
    elif fault == "odd_polygon":
        ann["segmentation"] = [[1.0, 1.0, 5.0, 1.0, 5.0]]
    else:
        ann["category_id"] = 99
    (root / "train.json").write_text(json.dumps(annotations))
    code, err = cli("det", "train", "--data", root, "--output", tmp_path / "run", "--quiet")
    assert code == 2 and message in err and str(root / "train.json") in err
    if fault != "missing_image":
        assert f"annotation {ann['id']}" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_det_commands_keep_the_epoch_map_categories_and_skip_bad_inputs(tmp_path, capsys, monkeypatch):
    import lesa.detection.task as det

    root, out = coco_root(tmp_path), tmp_path / "run"

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(det, "evaluate_detector", broken)
    assert main(["det", "train", "--data", str(root), "--config", str(tmp_path / "small.yaml"), "--epochs", "1",
                 "--batch-size", "3", "--min-size", "64", "--max-size", "96", "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"the evaluation after epoch 1 failed (IndexError: list index out of range); the epoch is saved in " \
           f"{out / 'last.pt'}" in err and f"lesa det eval --checkpoint {out / 'last.pt'}" in err
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["categories"] == CATEGORIES
    monkeypatch.undo()

    assert main(["det", "eval", "--checkpoint", str(out / "last.pt")]) == 0
    result = json.loads((out / "coco_eval.json").read_text())
    assert [(c["id"], c["name"], c["ground_truth"]) for c in result["categories"]] == \
        [(3, "three", 0), (7, "seven", 1), (9, "nine", 0)]
    assert "AP over the 1 categories with ground truth here" in capsys.readouterr().out

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    write_image(tmp_path / "big.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64x64 is over it, 32x32 under
    code = main(["det", "predict", str(tmp_path / "broken.jpg"), str(tmp_path / "big.png"),
                 str(root / "val" / "v.png"), "--checkpoint", str(out / "last.pt"), "--output", str(tmp_path / "pred")])
    captured = capsys.readouterr()
    assert code == 2 and sorted(p.name for p in (tmp_path / "pred").iterdir()) == [".lesa", "v.png"]  # and its marker
    assert "skipped: image" in captured.err and "broken.jpg cannot be read" in captured.err
    assert "big.png cannot be read: 4,096 pixels, more than PIL.Image.MAX_IMAGE_PIXELS" in captured.err
    assert "2 image(s) could not be read (named above); 1 drawn" in captured.err and "v.png: " in captured.out

    # the run keeps its mapping: a training file whose category 9 became 10 does not resume it
    for name in ("train.json", "val.json"):
        text = (root / name).read_text().replace('"category_id": 9', '"category_id": 10')
        (root / name).write_text(text.replace('"id": 9, "name": "nine"', '"id": 10, "name": "nine"'))
    assert main(["det", "train", "--data", str(root), "--config", str(tmp_path / "small.yaml"), "--epochs", "2",
                 "--batch-size", "3", "--min-size", "64", "--max-size", "96", "--output", str(out), "--resume",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has another category mapping than" in err and "(9 'nine' -> 10 'nine')" in err


def test_box_only_data_trains_the_box_only_detectors_end_to_end(tmp_path, capsys):
    """det train / eval / predict on box-only annotations over an EXIF-rotated JPEG and a 16-bit PNG, with a
    val file listing a subset of the categories: the mask detector asked for trains as its box-only form."""
    root, out = coco_root(tmp_path), tmp_path / "run"
    for name in ("train.json", "val.json"):
        data = json.loads((root / name).read_text())
        for ann in data["annotations"]:
            del ann["segmentation"]
        (root / name).write_text(json.dumps(data))
    train = ["det", "train", "--data", str(root), "--config", str(tmp_path / "small.yaml"), "--batch-size", "3",
             "--min-size", "64", "--max-size", "96", "--output", str(out)]
    assert main([*train, "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    assert "train.json has boxes only (no 'segmentation'): training Faster R-CNN, Mask R-CNN without its mask " \
           "heads (box AP only)" in captured.err
    assert "Faster R-CNN + lesa_resnet_tiny: box AP" in captured.out and "mask AP" not in captured.out
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["detector"] == "fasterrcnn" and not any("mask" in k for k in state["model"])
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "bbox_AP" in header and not any("segm" in c or "mask" in c for c in header)
    assert main([*train, "--epochs", "2", "--resume", "--quiet"]) == 0  # resumes under the detector asked for

    assert main(["det", "eval", "--checkpoint", str(out)]) == 0
    result = json.loads((out / "coco_eval.json").read_text())
    assert "bbox" in result and "segm" not in result
    assert [c["id"] for c in result["categories"]] == [3, 7, 9]
    code = main(["det", "predict", str(root / "train" / "a.jpg"), str(root / "train" / "b.png"),
                 "--checkpoint", str(out), "--output", str(tmp_path / "pred"), "--score-threshold", "0"])
    assert code == 0 and Image.open(tmp_path / "pred" / "a.png").size == (32, 48)  # drawn upright

    for name, (height, width) in (("a", (48, 32)), ("b", (32, 32)), ("c", (32, 32))):  # COCO-stuff-like maps
        (root / "train2017").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((height, width), np.uint8)).save(root / "train2017" / f"{name}.png")
    with_semantic = ["--detector", "htc", "--semantic-root", str(root), "--output", str(tmp_path / "htc"), "--quiet"]
    assert main([*train[:-2], *with_semantic, "--epochs", "1"]) == 2
    assert "box-only (no annotation has a 'segmentation'): HTC with the semantic branch needs instance masks" \
        in capsys.readouterr().err


def test_det_resume_keeps_the_run_detector_and_eval_needs_only_val(tmp_path, capsys):
    """A Faster R-CNN run on masked data resumes without --detector as Faster R-CNN (was: Mask R-CNN built, a
    load_state_dict traceback), and a --detector that cannot continue it is one line; --max-repaired lifts the
    1% limit; det eval reads a folder with val.json + val/ alone (was: "no train annotations"); --data given a
    file, and det predict given a folder, say so; a mask model on box-only val shows "mask AP -"."""
    root, out = coco_root(tmp_path), tmp_path / "run"
    data = json.loads((root / "train.json").read_text())  # a box 5 px out of its image: 1 of 7 repaired
    data["annotations"].append(box(7, image_id=3, bbox=(-5, 4, 12, 12), segmentation=square(0, 4, 12)))
    (root / "train.json").write_text(json.dumps(data))
    train = ["det", "train", "--data", str(root), "--config", str(tmp_path / "small.yaml"), "--batch-size", "3",
             "--min-size", "64", "--max-size", "96", "--output", str(out), "--quiet"]
    assert main([*train, "--epochs", "1", "--detector", "fasterrcnn"]) == 2
    assert "1 of 7 annotations (14.3%) needed repair (1 box(es) clipped to their image; e.g. annotation 7 (image 3)" \
        in capsys.readouterr().err
    assert main([*train, "--epochs", "1", "--detector", "fasterrcnn", "--max-repaired", "0.2"]) == 0
    assert main([*train, "--epochs", "2", "--max-repaired", "0.2", "--resume"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["detector"] == "fasterrcnn"
    capsys.readouterr()
    assert main([*train, "--epochs", "3", "--max-repaired", "0.2", "--resume", "--detector", "maskrcnn"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: the run in {out} is a Faster R-CNN run (fasterrcnn); --detector maskrcnn builds Mask R-CNN " \
           "on train.json (masks), which cannot continue it: pass --detector fasterrcnn, or leave --detector out" in err
    assert err.count("\n") == 1

    val_only = tmp_path / "val_only"
    (val_only / "val").mkdir(parents=True)
    (val_only / "val.json").write_text((root / "val.json").read_text())
    (val_only / "val" / "v.png").write_bytes((root / "val" / "v.png").read_bytes())
    evaluation = str(tmp_path / "e")
    assert main(["det", "eval", "--checkpoint", str(out), "--data", str(val_only), "--output", evaluation]) == 0
    assert "bbox" in json.loads((tmp_path / "e" / "coco_eval.json").read_text())
    capsys.readouterr()
    assert main(["det", "eval", "--checkpoint", str(out), "--data", str(root / "val.json")]) == 2
    assert f"detection data '{root / 'val.json'}' is a file, not a COCO root folder: pass the folder that holds " \
           "train.json + train/ and val.json + val/" in capsys.readouterr().err
    code = main(["det", "predict", str(root / "val"), str(root / "val" / "v.png"), "--checkpoint", str(out),
                 "--output", str(tmp_path / "pred")])
    assert code == 2 and f"image {root / 'val'} cannot be read: it is a folder, not an image; pass the images in " \
        f"it, e.g. {root / 'val' / '*.png'}" in capsys.readouterr().err

    data = json.loads((root / "val.json").read_text())  # box-only val for a mask model
    for ann in data["annotations"]:
        del ann["segmentation"]
    (root / "val.json").write_text(json.dumps(data))
    assert main([*train[:-3], "--output", str(tmp_path / "mask"), "--epochs", "1", "--max-repaired", "0.2"]) == 0
    assert ", mask AP - (" in capsys.readouterr().err


def test_an_undecodable_training_image_is_skipped_and_counted_like_classification(tmp_path, capsys):
    """An image whose header reads but whose pixels do not (truncated) is named, skipped and counted against
    --max-bad-fraction, the same rule as classification; over it, one line."""
    root, out = coco_root(tmp_path), tmp_path / "run"
    write_image(root / "train" / "c.jpg", (96, 96), array=np.random.default_rng(1).integers(0, 255, (96, 96, 3),
                                                                                           dtype=np.uint8))
    data = (root / "train" / "c.jpg").read_bytes()
    (root / "train" / "c.jpg").write_bytes(data[: len(data) // 2])  # the header reads, the pixels end early
    train = json.loads((root / "train.json").read_text())
    train["images"][2].update(file_name="c.jpg", width=96, height=96)
    (root / "train.json").write_text(json.dumps(train))
    command = ["det", "train", "--data", str(root), "--config", str(tmp_path / "small.yaml"), "--batch-size", "3",
               "--min-size", "64", "--max-size", "96", "--epochs", "1", "--quiet"]
    assert main([*command, "--output", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 images read so far could not be decoded, more than max_bad_fraction=0.001" in err
    assert "--max-bad-fraction" in err
    with pytest.warns(UserWarning, match="skipped: .*c.jpg"):
        assert main([*command, "--output", str(out), "--max-bad-fraction", "0.5"]) == 0
    assert json.loads((out / "summary.json").read_text())["skipped_images"] == 1

    # evaluation: the truncated image is left out of AP and reported (the other images are scored)
    (root / "val" / "c.jpg").write_bytes((root / "train" / "c.jpg").read_bytes())
    val = json.loads((root / "val.json").read_text())
    val["images"].append(dict(id=5, file_name="c.jpg", width=96, height=96))
    (root / "val.json").write_text(json.dumps(val))
    with pytest.warns(UserWarning, match="skipped: .*c.jpg"):
        assert main(["det", "eval", "--checkpoint", str(out)]) == 0
    assert "1 image(s) could not be decoded and are left out of AP (ids [5]" in capsys.readouterr().err
    assert json.loads((out / "coco_eval.json").read_text())["skipped_images"] == [5]
