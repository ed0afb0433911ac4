"""Region features: the store (round trip, atomic and resumable writes, errors), BUTD/LXMERT tsv, extraction, CLI."""

import hashlib
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vlbench.data.butd_tsv import ButdRow, convert_tsv_to_store, iter_tsv, write_tsv
from vlbench.data.cli import main
from vlbench.data.extract import ExtractionConfig, extract_features
from vlbench.data.regions import (
    RegionStore,
    RegionStoreWriter,
    image_key,
    pad_regions,
    require_feature_dim,
)
from vlbench.errors import VlbenchError

D = 16
STORE_FILES = ("features.npy", "boxes.npy", "object_ids.npy", "object_conf.npy", "attr_ids.npy", "attr_conf.npy")
TINY = ExtractionConfig(backbone="resnet18", image_size=64, batch_size=2, roi_size=2)


def make_images(n: int = 6, seed: int = 0) -> list[dict]:
    """Random BUTD-like images: varying box counts (one with none), labels, pixel sizes."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        count = 0 if i == 2 else int(rng.integers(1, 9))
        corners = rng.random((count, 2, 2), dtype=np.float32)
        images.append(
            {
                "key": f"img{i}",
                "features": rng.standard_normal((count, D), dtype=np.float32) * 3,
                "boxes": np.concatenate([corners.min(1), corners.max(1)], axis=1),
                "img_h": int(rng.integers(100, 500)),
                "img_w": int(rng.integers(100, 500)),
                "object_ids": rng.integers(0, 1600, count),
                "object_conf": rng.random(count, dtype=np.float32),
                "attr_ids": rng.integers(0, 400, count),
                "attr_conf": rng.random(count, dtype=np.float32),
            }
        )
    return images


def add(writer: RegionStoreWriter, image: dict) -> None:
    writer.add(**image)


def file_digests(path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in (*STORE_FILES, "index.npy")}


def assert_matches(store: RegionStore, images: list[dict]) -> None:
    assert len(store) == len(images) and set(store) == {im["key"] for im in images}
    for im in images:
        r = store[im["key"]]
        assert r.features.dtype == np.float32 and r.features.shape == (len(im["boxes"]), D)
        np.testing.assert_allclose(r.features, im["features"], rtol=1e-3, atol=1e-3)  # fp16 on disk
        np.testing.assert_allclose(r.boxes, im["boxes"], atol=1e-6)
        for name in ("object_ids", "object_conf", "attr_ids", "attr_conf"):
            np.testing.assert_array_equal(getattr(r, name), im[name])
        assert (r.img_h, r.img_w, r.num_boxes) == (im["img_h"], im["img_w"], len(im["boxes"]))


def test_store_round_trip_in_any_key_order(tmp_path):
    images = make_images()
    shuffled = random.Random(1).sample(images, len(images))
    for name, order in (("a", images), ("b", shuffled)):
        with RegionStoreWriter(tmp_path / name, D, source="test") as writer:
            for im in order:
                add(writer, im)
    a, b = RegionStore(tmp_path / "a"), RegionStore(tmp_path / "b")
    assert_matches(a, images)
    assert_matches(b, images)
    assert a.fingerprint == b.fingerprint  # content, not write order
    assert a.max_boxes == max(len(im["boxes"]) for im in images) and a.feature_dim == D
    assert "img0" in a and "nope" not in a and 3 not in a
    half = RegionStore(tmp_path / "a", features_dtype="float16")["img1"].features
    assert half.dtype == np.float16 and np.array_equal(half, images[1]["features"].astype(np.float16))
    assert RegionStore(tmp_path / "a").read_features("img1").dtype == torch.float32
    # plain numpy reads the arrays too (the layout is documented, not private)
    assert np.load(tmp_path / "a" / "features.npy", mmap_mode="r").shape == (a.meta["num_boxes"], D)


def test_coco_names_and_integer_ids_are_one_key(tmp_path):
    assert image_key("COCO_val2014_000000000042") == "42" == image_key(42)
    assert image_key("n161313") == "n161313" and image_key("dev-850-0-img0") == "dev-850-0-img0"
    with RegionStoreWriter(tmp_path / "s", D, source="test") as writer:
        writer.add("COCO_train2014_000000000007", np.ones((1, D)), np.array([[0, 0, 1, 1]]), 10, 10)
    store = RegionStore(tmp_path / "s")
    assert list(store) == ["7"] and store[7].key == "7" and store["COCO_train2014_000000000007"].num_boxes == 1


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_key_not_a_store_and_inconsistent_index_errors(tmp_path):
    with RegionStoreWriter(tmp_path / "s", D, source="test") as writer:
        for im in make_images(3):
            add(writer, im)
    with pytest.raises(VlbenchError) as e:
        RegionStore(tmp_path / "s")["img9"]
    assert str(tmp_path / "s") in one_line_error(e) and "'img9'" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlbenchError, match="not a region store") as e:
        RegionStore(tmp_path / "empty")
    assert str(tmp_path / "empty") in one_line_error(e)
    with pytest.raises(VlbenchError, match="not found"):
        RegionStore(tmp_path / "absent")
    index = np.load(tmp_path / "s" / "index.npy")
    index[1, 0] += 1
    np.save(tmp_path / "s" / "index.npy", index)
    with pytest.raises(VlbenchError, match="index is inconsistent") as e:
        RegionStore(tmp_path / "s")
    assert str(tmp_path / "s") in one_line_error(e)


def test_writer_rejects_pixel_boxes_duplicates_and_fp16_overflow(tmp_path):
    with RegionStoreWriter(tmp_path / "s", D, source="test") as writer:
        with pytest.raises(VlbenchError, match="normalised"):
            writer.add("a", np.zeros((1, D)), np.array([[10, 10, 200, 300]]), 480, 640)
        with pytest.raises(VlbenchError, match="float16"):
            writer.add("a", np.full((1, D), 1e6), np.array([[0, 0, 1, 1]]), 480, 640)
        with pytest.raises(VlbenchError, match=r"features \[1, 8\], expected \[1, 16\]"):
            writer.add("a", np.zeros((1, 8)), np.array([[0, 0, 1, 1]]), 480, 640)
        writer.add("a", np.zeros((1, D)), np.array([[0, 0, 1, 1]]), 480, 640)
        with pytest.raises(VlbenchError, match="added twice"):
            writer.add("a", np.zeros((1, D)), np.array([[0, 0, 1, 1]]), 480, 640)
    with pytest.raises(VlbenchError, match="already exists"):
        RegionStoreWriter(tmp_path / "s", D, source="test")


def test_exception_mid_write_leaves_no_store_and_resume_equals_uninterrupted(tmp_path):
    images = make_images(8)
    with RegionStoreWriter(tmp_path / "whole", D, source="test", commit_every=3) as writer:
        for im in images:
            add(writer, im)

    target = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt), RegionStoreWriter(target, D, source="test", commit_every=3) as writer:
        for im in images[:5]:
            add(writer, im)
        raise KeyboardInterrupt
    assert not target.exists() and (tmp_path / "resumed.partial" / "progress.json").is_file()
    with pytest.raises(VlbenchError, match="unfinished"):
        RegionStore(target)
    # A kill during the next commit leaves bytes past the progress marker: resuming must drop them.
    with open(tmp_path / "resumed.partial" / "features.npy", "ab") as f:
        f.write(b"\x01" * 1000)
    with pytest.raises(VlbenchError, match="different settings"):
        RegionStoreWriter(target, D, source="other")
    with RegionStoreWriter(target, D, source="test", commit_every=3) as writer:
        assert writer.resumed_images == 5 and "img4" in writer and "img5" not in writer
        for im in images:
            if im["key"] not in writer:
                add(writer, im)
    assert not (tmp_path / "resumed.partial").exists()
    assert file_digests(target) == file_digests(tmp_path / "whole")
    assert RegionStore(target).fingerprint == RegionStore(tmp_path / "whole").fingerprint


def test_pad_regions_and_feature_dim_check(tmp_path):
    images = make_images(3)
    with RegionStoreWriter(tmp_path / "s", D, source="test") as writer:
        for im in images:
            add(writer, im)
    store = RegionStore(tmp_path / "s")
    counts = [len(im["boxes"]) for im in images]
    batch = pad_regions([store[im["key"]] for im in images], max_boxes=4)
    assert batch["features"].shape == (3, 4, D) and batch["boxes"].shape == (3, 4, 4)
    assert batch["mask"].sum(1).tolist() == [min(c, 4) for c in counts]
    assert torch.equal(batch["boxes"][0, : min(counts[0], 4)], torch.from_numpy(images[0]["boxes"][:4]))
    assert (batch["object_ids"][~batch["mask"]] == -1).all() and (batch["features"][~batch["mask"]] == 0).all()
    require_feature_dim(store, D, "model.visual_feat_dim")
    with pytest.raises(VlbenchError) as e:
        require_feature_dim(store, 2048, "model.visual_feat_dim")
    assert str(tmp_path / "s") in one_line_error(e) and "model.visual_feat_dim=2048" in str(e.value)


# ---- BUTD / LXMERT tsv -------------------------------------------------------------------------------------------


def tsv_rows(n: int = 5) -> list[ButdRow]:
    rows = []
    for i, im in enumerate(make_images(n)):
        scale = np.array([im["img_w"], im["img_h"], im["img_w"], im["img_h"]], np.float32)
        rows.append(
            ButdRow(
                f"COCO_val2014_{i + 1:012d}",
                im["img_h"],
                im["img_w"],
                im["object_ids"],
                im["object_conf"],
                im["attr_ids"],
                im["attr_conf"],
                im["boxes"] * scale,
                im["features"],
            )
        )
    return rows


def test_tsv_round_trip_into_the_store(tmp_path):
    rows = tsv_rows()
    write_tsv(tmp_path / "a.tsv", rows[:3])
    write_tsv(tmp_path / "b.tsv", rows[3:])
    read = list(iter_tsv(tmp_path / "a.tsv"))
    assert [r.img_id for r in read] == [r.img_id for r in rows[:3]]
    np.testing.assert_array_equal(read[1].features, rows[1].features)
    store = convert_tsv_to_store([tmp_path / "a.tsv", tmp_path / "b.tsv"], tmp_path / "store", progress=False)
    assert len(store) == 5 and store.meta["source"] == "butd-tsv"
    for i, row in enumerate(rows):
        r = store[str(i + 1)]
        scale = np.array([row.img_w, row.img_h, row.img_w, row.img_h], np.float32)
        np.testing.assert_allclose(r.boxes, row.boxes / scale, atol=1e-6)
        assert r.boxes.size == 0 or r.boxes.max() <= 1.0
        np.testing.assert_allclose(r.features, row.features, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(r.object_ids, row.objects_id)
        np.testing.assert_array_equal(r.attr_conf, row.attrs_conf)
    # export back: pixel boxes again
    write_tsv(tmp_path / "export.tsv", (ButdRow.from_regions(store[k]) for k in store))
    exported = list(iter_tsv(tmp_path / "export.tsv"))
    np.testing.assert_allclose(exported[0].boxes, rows[0].boxes, rtol=1e-5)


def corrupt(line: str, how: str) -> str:
    fields = line.rstrip("\n").split("\t")
    if how == "truncated":  # a file cut mid-write: the last line ends inside the features
        return line[: len(line) // 2]
    if how == "missing fields":
        fields = fields[:8]
    if how == "bad base64":
        fields[9] = "!!" + fields[9][2:]
    if how == "wrong num_boxes":
        fields[7] = str(int(fields[7]) + 1)
    return "\t".join(fields) + "\n"


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "field features holds"),
        ("missing fields", "8 tab-separated fields, expected 10"),
        ("bad base64", "field features is not valid base64"),
        ("wrong num_boxes", "field objects_id holds"),
    ],
)
def test_corrupt_tsv_line_fails_naming_file_and_line(tmp_path, how, message):
    path = tmp_path / "x.tsv"
    write_tsv(path, tsv_rows(4))
    lines = path.read_text().splitlines(keepends=True)
    lines[3 if how == "truncated" else 1] = corrupt(lines[3 if how == "truncated" else 1], how)
    path.write_text("".join(lines))
    line_num = 4 if how == "truncated" else 2
    with pytest.raises(VlbenchError) as e:
        convert_tsv_to_store([path], tmp_path / "store", progress=False)
    assert one_line_error(e).startswith(f"{path}:{line_num}: ") and message in str(e.value)
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


# ---- extraction --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    """Five tiny PNGs (COCO-style names, different sizes), GQA-shaped scene graphs for four, a box file for two."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    graphs = {}
    for i in range(1, 6):
        h, w = 40 + 4 * i, 64
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val2014" / f"COCO_val2014_{i:012d}.png")
        if i < 5:
            objects = {
                str(j): {"name": name, "x": 4 * j, "y": 3, "w": 20, "h": 15, "attributes": attrs, "relations": []}
                for j, (name, attrs) in enumerate([("circle", ["red", "small"]), ("square", ["blue"]), ("cone", [])])
            }
            graphs[str(i)] = {"width": w, "height": h, "objects": objects}
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "val_sceneGraphs.json").write_text(json.dumps(graphs))
    (tmp_path / "graphs" / "objects_vocab.txt").write_text("square,box\nball,circle\n")
    (tmp_path / "boxes.json").write_text(json.dumps({"1": [[0, 0, 32, 22], [10, 5, 64, 44]], "3": [[1, 2, 3, 4]]}))
    return root


def test_extraction_over_gt_grid_and_file_boxes(tmp_path, image_dir):
    gt = extract_features(
        image_dir,
        tmp_path / "gt",
        replace(TINY, boxes=f"gt:{tmp_path / 'graphs' / 'val_sceneGraphs.json'}"),
        progress=False,
    )
    assert sorted(gt) == ["1", "2", "3", "4"] and gt.feature_dim == 512  # resnet18's last stage
    r = gt["2"]
    assert r.features.shape == (3, 512) and (r.img_h, r.img_w) == (48, 64)
    np.testing.assert_allclose(r.boxes[1], [4 / 64, 3 / 48, 24 / 64, 18 / 48], atol=1e-6)
    # labels from the vocab files beside the graphs (synonyms share a line); no attribute vocab: sorted names
    assert r.object_ids.tolist() == [1, 0, -1] and r.object_conf.tolist() == [1.0, 1.0, 0.0]
    assert gt.vocab("attributes") == ["blue", "red", "small"] and r.attr_ids.tolist() == [1, 0, -1]

    grid = extract_features(image_dir, tmp_path / "grid", replace(TINY, boxes="grid:3"))
    assert len(grid) == 5 and grid["5"].features.shape == (9, 512)
    np.testing.assert_allclose(grid["5"].boxes[4], [1 / 3, 1 / 3, 2 / 3, 2 / 3], atol=1e-6)
    assert (grid["5"].object_ids == -1).all()

    boxes_cfg = replace(TINY, boxes=f"file:{tmp_path / 'boxes.json'}")
    from_file = extract_features(image_dir, tmp_path / "file", boxes_cfg, progress=False)
    assert sorted(from_file) == ["1", "3"] and from_file["1"].num_boxes == 2
    np.testing.assert_allclose(from_file["1"].boxes[0], [0, 0, 0.5, 0.5], atol=1e-6)
    assert not np.allclose(from_file["1"].features[0], from_file["1"].features[1])


def test_extraction_is_deterministic_and_resumes_to_the_same_store(tmp_path, image_dir, monkeypatch):
    cfg = replace(TINY, boxes="grid:2")
    extract_features(image_dir, tmp_path / "a", cfg, progress=False)
    extract_features(image_dir, tmp_path / "b", cfg, progress=False)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")

    real_add, added = RegionStoreWriter.add, []

    def add_then_die(self, key, *args, **kwargs):
        if len(added) == 3:  # mid-batch: batches are pairs
            raise KeyboardInterrupt
        added.append(key)
        real_add(self, key, *args, **kwargs)

    monkeypatch.setattr(RegionStoreWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        extract_features(image_dir, tmp_path / "c", cfg, progress=False)
    assert not (tmp_path / "c").exists() and (tmp_path / "c.partial" / "progress.json").is_file()
    added_again = []

    def add_and_count(self, key, *args, **kwargs):
        added_again.append(key)
        real_add(self, key, *args, **kwargs)

    monkeypatch.setattr(RegionStoreWriter, "add", add_and_count)
    store = extract_features(image_dir, tmp_path / "c", cfg, progress=False)
    assert len(store) == 5 and file_digests(tmp_path / "c") == file_digests(tmp_path / "a")
    assert sorted(added_again) == sorted(set(store.keys()) - set(added))  # resumed: the 3 committed not redone


def test_extraction_loads_a_local_checkpoint_and_never_downloads_by_default(tmp_path, image_dir, monkeypatch):
    import timm.models._builder as builder

    def no_download(*args, **kwargs):
        raise AssertionError("extraction tried to download weights")

    for name in ("download_cached_file", "load_state_dict_from_url", "load_state_dict_from_hf"):
        monkeypatch.setattr(builder, name, no_download)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    random_init = extract_features(image_dir, tmp_path / "a", replace(TINY, boxes="grid:1"))
    loaded_cfg = replace(TINY, boxes="grid:1", pretrained=str(tmp_path / "r18.pth"))
    loaded = extract_features(image_dir, tmp_path / "b", loaded_cfg, progress=False)
    assert loaded.meta["settings"]["pretrained_sha256"]
    assert not np.allclose(random_init["1"].features, loaded["1"].features)
    with pytest.raises(VlbenchError, match="checkpoint file not found"):
        extract_features(image_dir, tmp_path / "c", replace(TINY, pretrained="nope.pth"))


# ---- the real entry point ----------------------------------------------------------------------------------------


def test_cli_extract_convert_and_bench(tmp_path, image_dir, capsys):
    main(["extract-features", "--images", str(image_dir), "--out", str(tmp_path / "x"), "--boxes", "grid:2",
          "--backbone", "resnet18", "--image-size", "64", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert "5 images, 20 boxes" in capsys.readouterr().out
    assert RegionStore(tmp_path / "x").meta["settings"]["roi_size"] == ExtractionConfig().roi_size

    write_tsv(tmp_path / "a.tsv", tsv_rows(3))
    main(["convert-tsv", str(tmp_path / "a.tsv"), "--out", str(tmp_path / "t"), "--no-progress"])
    assert "3 images" in capsys.readouterr().out

    for extra, expected in (([], "float32 tensors, page cache warm"), (["--cold"], "page cache cold")):
        main(["bench-loader", str(tmp_path / "b"), "--make", "30", "--dim", "64", "--samples", "200", *extra])
        out = capsys.readouterr().out
        assert "30 images, 1080 boxes" in out and "samples/s" in out and expected in out

    with pytest.raises(SystemExit) as e:
        main(["convert-tsv", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "y")])
    assert e.value.code == 2
    error = f"vlbench-data: error: {tmp_path / 'missing.tsv'}: tsv file not found"
    assert capsys.readouterr().err.strip().splitlines() == [error]


def test_cli_help_names_the_extraction_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["extract-features", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    d = ExtractionConfig()
    for default in (f"default {d.boxes}", f"default {d.backbone}", f"default {d.image_size}",
                    f"default {d.batch_size}", f"default {d.roi_size}", f"default {d.seed}"):  # fmt: skip
        assert default in text
    assert d.channels_last and "--no-channels-last" in text and "(default true)" in text


def test_channels_last_extraction_equals_contiguous_and_is_recorded(tmp_path, image_dir):
    fast = extract_features(image_dir, tmp_path / "fast", replace(TINY, boxes="grid:2"), progress=False)
    plain_cfg = replace(TINY, boxes="grid:2", channels_last=False)
    plain = extract_features(image_dir, tmp_path / "plain", plain_cfg, progress=False)
    assert fast.meta["settings"]["channels_last"] and not plain.meta["settings"]["channels_last"]
    for key in plain:
        np.testing.assert_allclose(fast[key].features, plain[key].features, atol=1e-5, rtol=1e-3)


def test_region_extraction_on_the_synthetic_world_leaves_its_data_fingerprint_unchanged(tmp_path):
    """A run's data fingerprint covers the dataset's own files: the merged box file that extraction writes beside them
    must not change it, or a machine where a region model ran first records different data for the same world."""
    from omegaconf import OmegaConf

    from vlbench.data.sources import MERGED_BOXES_FILE, dataset_json_files, synthetic_region_store
    from vlbench.data.synthetic import SyntheticConfig, ensure_world
    from vlbench.results import file_fingerprints

    config = SyntheticConfig(images={"train": 8, "val": 4, "test": 4}, questions_per_image=2)
    folder = ensure_world(config, "vqav2", tmp_path)
    before = file_fingerprints(dataset_json_files(folder))
    assert "v2_mscoco_train2014_annotations.json" in before[1] and "train_sceneGraphs.json" in before[1]
    data_cfg = OmegaConf.create({"region_backbone": "pixels", "region_roi_size": 7, "image_size": 64})
    synthetic_region_store(data_cfg, folder)
    assert (folder / MERGED_BOXES_FILE).is_file()
    assert file_fingerprints(dataset_json_files(folder)) == before


def test_parallel_jobs_extract_the_synthetic_store_once(tmp_path, monkeypatch):
    """Jobs of a local sweep are separate processes: while one extracts a store (holding its lock), another waits and
    then finds it finished, instead of writing the same partial folder at the same time."""
    import threading

    from omegaconf import OmegaConf

    from vlbench.data import extract
    from vlbench.data.files import exclusive_lock
    from vlbench.data.sources import synthetic_region_store
    from vlbench.data.synthetic import SyntheticConfig, ensure_world

    config = SyntheticConfig(images={"train": 4, "val": 2, "test": 2}, questions_per_image=1)
    folder = ensure_world(config, "vqav2", tmp_path)
    data_cfg = OmegaConf.create({"region_backbone": "pixels", "region_roi_size": 7, "image_size": 64})
    extractions, real_extract = [], extract.extract_features

    def counted(images, store, *args, **kwargs):
        extractions.append(store)
        return real_extract(images, store, *args, **kwargs)

    monkeypatch.setattr(extract, "extract_features", counted)
    first = synthetic_region_store(data_cfg, folder)  # the first job extracts
    lock = folder / f".{first.name}.lock"
    assert lock.is_file() and extractions == [first]
    (first / "meta.json").rename(first / "meta.json.hidden")  # as if still being extracted when the next job starts
    stores = []
    job = threading.Thread(target=lambda: stores.append(synthetic_region_store(data_cfg, folder)))
    with exclusive_lock(lock):  # held as the extracting job holds it (flock: per open file, so threads contend too)
        job.start()
        job.join(1.0)
        assert job.is_alive() and not stores  # waits for the lock
        (first / "meta.json.hidden").rename(first / "meta.json")  # the first job finishes
    job.join(30)
    assert stores == [first] and extractions == [first]  # found finished inside the lock: not extracted again
