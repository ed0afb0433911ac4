"""The one dataset/collate every task uses: text + one or two images, pixels or region features."""

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlbench.data.images import ImageLoader
from vlbench.data.regions import RegionStore, RegionStoreWriter
from vlbench.tasks.datasets import ExampleDataset, ImageRef, VisualReader, select_image


@pytest.fixture
def tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _png(path, colour):
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_two_images_per_example_collate_under_suffixed_keys(tmp_path, tokenizer):
    refs = [ImageRef(_png(tmp_path / f"{k}.png", (40 * k, 0, 0)), str(k)) for k in range(4)]
    visual = VisualReader("pixels", image_loader=ImageLoader(8, [0.0] * 3, [1.0] * 3))
    dataset = ExampleDataset(
        ["a red circle", "a circle"],
        [(refs[0], refs[1]), (refs[2], refs[3])],
        tokenizer,
        16,
        visual,
        targets=[1, 0],
        collate_targets=lambda t: {"labels": torch.tensor(t)},
    )
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["pixel_values_img0"].shape == (2, 3, 8, 8) and "pixel_values" not in batch
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    right = select_image(batch, 1)
    assert set(right) == {"index", "input_ids", "attention_mask", "group_ids", "labels", "pixel_values"}
    assert torch.allclose(right["pixel_values"][1, 0], torch.full((8, 8), 120 / 255))


def test_region_features_are_padded_with_a_mask(tmp_path, tokenizer):
    with RegionStoreWriter(tmp_path / "store", 4, source="test") as writer:
        for key, n in (("1", 2), ("2", 5)):
            boxes = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], dtype=np.float32), (n, 1))
            writer.add(key, np.full((n, 4), float(key), dtype=np.float32), boxes, img_h=8, img_w=8)
    visual = VisualReader("regions", region_store=RegionStore(tmp_path / "store"), max_regions=3)
    dataset = ExampleDataset(["a", "red"], [[ImageRef(tmp_path / "x", "1")], [ImageRef(tmp_path / "y", "2")]],
                             tokenizer, 8, visual)  # fmt: skip
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["region_features"].shape == (2, 3, 4)
    assert batch["region_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["region_features"][1].eq(2.0).all() and batch["region_features"][0, 2].eq(0).all()
    assert batch["region_object_ids"].tolist()[0] == [-1, -1, -1]


def test_region_batches_are_padded_to_the_stores_largest_image_not_beyond(tmp_path, tokenizer):
    # padding every image to max_regions=36 when no image has more than 5 boxes costs a region model ~8x its compute
    with RegionStoreWriter(tmp_path / "store", 4, source="test") as writer:
        for key, n in (("1", 2), ("2", 5), ("3", 3)):
            boxes = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], dtype=np.float32), (n, 1))
            writer.add(key, np.full((n, 4), float(key), dtype=np.float32), boxes, img_h=8, img_w=8)
    visual = VisualReader("regions", region_store=RegionStore(tmp_path / "store"), max_regions=36)
    dataset = ExampleDataset(["a", "red"], [[ImageRef(tmp_path / "x", "1")], [ImageRef(tmp_path / "z", "3")]],
                             tokenizer, 8, visual)  # fmt: skip
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["region_features"].shape == (2, 5, 4)  # the store's largest image (key 2), not this batch's 3
    assert batch["region_mask"].sum(1).tolist() == [2, 3]


def test_images_are_normalised_per_batch_exactly_as_one_by_one(tmp_path):
    """Examples carry uint8 pixels (a quarter of the bytes to stack and to pass between loader processes); the batch
    is normalised once, with every value equal to normalising each image alone."""
    loader = ImageLoader(8, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], cache=True)
    paths = [_png(tmp_path / f"{k}.png", (37 * k, 255 - 20 * k, 3 * k)) for k in range(5)]
    reader = VisualReader("pixels", image_loader=loader)
    loaded = [reader.load(ImageRef(p, str(k))) for k, p in enumerate(paths)]
    assert all(x.dtype == torch.uint8 and x.shape == (3, 8, 8) and x.is_contiguous() for x in loaded)
    batch = reader.collate(loaded)["pixel_values"]
    assert batch.dtype == torch.float32 and torch.equal(batch, torch.stack([loader(p) for p in paths]))
