"""The ``regions`` side of the model ↔ task contract end to end: features extracted from the world's images into a
store, read by the task, padded by the collate, eaten by a region model, checked against the model's feature size."""

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from vlbench.data.extract import ExtractionConfig, extract_features
from vlbench.errors import VlbenchError
from vlbench.models.base import JointEncoding, TextSizes, VisionLanguageModel
from vlbench.models.layers import TextEncoder
from vlbench.registry import MODELS
from vlbench.runner import run


class RegionBag(VisionLanguageModel):
    """Test-only region model: text [CLS] plus the masked mean of projected region features and boxes."""

    visual_input = "regions"
    seen: list[tuple] = []  # (training?, feature shape, regions per example) of every batch encoded, any instance

    def __init__(self, cfg, ctx):
        super().__init__()
        sizes = TextSizes(**cfg.text)
        self.hidden_size = sizes.hidden_size
        self.text_encoder = TextEncoder(ctx.vocab_size, sizes, cfg.text_layers)
        self.region_proj = nn.Linear(cfg.visual_feature_dim + 4, sizes.hidden_size)

    def encode(self, batch):
        features, boxes, mask = batch["region_features"], batch["region_boxes"], batch["region_mask"]
        RegionBag.seen.append((self.training, tuple(features.shape), mask.sum(1).tolist()))
        regions = self.region_proj(torch.cat([features, boxes], dim=-1)) * mask[..., None]
        pooled_regions = regions.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        tokens = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        return JointEncoding(pooled=tokens[:, 0] + pooled_regions, tokens=tokens, mask=batch["attention_mask"])


@pytest.fixture
def region_model():
    MODELS.register("regionbag")(RegionBag)
    RegionBag.seen.clear()
    yield
    MODELS._builders.pop("regionbag")


@pytest.fixture(scope="module")
def world_store(tmp_path_factory, small_world_module):
    store = tmp_path_factory.mktemp("regions") / "grid2"
    config = ExtractionConfig(backbone="resnet18", boxes="grid:2", image_size=64, batch_size=64)
    extract_features(small_world_module / "images", store, config, progress=False)
    return store


@pytest.fixture(scope="module")
def small_world_module(tmp_path_factory):
    import os

    from vlbench.data.synthetic import SyntheticConfig, ensure_world

    cache = os.environ.get("VLBENCH_CACHE") or str(tmp_path_factory.mktemp("cache"))
    config = SyntheticConfig(images={"train": 96, "val": 24, "test": 24}, questions_per_image=3)
    return ensure_world(config, "vqav2", cache)


def _as_region_model(cfg, feature_dim=512):
    """The textonly config, renamed to the test model and given the field region models declare."""
    model = OmegaConf.to_container(cfg.model)
    with open_dict(cfg):
        cfg.model = OmegaConf.create({**model, "name": "regionbag", "visual_feature_dim": feature_dim})
    return cfg


def _cfg(make_cfg, store, *overrides):
    return _as_region_model(make_cfg("model=textonly", f"data.datasets.vqav2.region_features={store}", *overrides))


def test_a_region_model_trains_on_stored_features(make_cfg, tmp_path, world_store, region_model, cache_dir):
    result = run(_cfg(make_cfg, world_store, f"data.cache_dir={cache_dir}"), tmp_path / "run")
    assert 0 <= result["metrics"]["accuracy"] <= 100
    assert result["train_samples"] == 64
    # the model was fed the store's features: a 2 × 2 grid of boxes → 4 regions of 512-d ResNet-18 features each
    training = [(shape, regions) for is_training, shape, regions in RegionBag.seen if is_training]
    batch_size = 16  # tests/conftest.py's trainer.batch_size
    assert len(training) == 64 // batch_size
    assert all(shape == (batch_size, 4, 512) and regions == [4] * batch_size for shape, regions in training)
    assert any(not is_training for is_training, _, _ in RegionBag.seen)  # and evaluated on them


def test_feature_size_mismatch_fails_before_training(make_cfg, tmp_path, world_store, region_model):
    cfg = _as_region_model(make_cfg("model=textonly", f"data.datasets.vqav2.region_features={world_store}"), 2048)
    with pytest.raises(VlbenchError, match=r"holds 512-d features but model.visual_feature_dim=2048"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_the_synthetic_world_extracts_region_features_on_first_use(make_cfg, tmp_path, region_model):
    from vlbench.data.regions import RegionStore
    from vlbench.data.sources import resolve_data_root

    cfg = _as_region_model(make_cfg("model=textonly"), feature_dim=147)  # pixels backbone: 3 × 7 × 7
    result = run(cfg, tmp_path / "run")
    assert 0 <= result["metrics"]["accuracy"] <= 100
    stores = list(resolve_data_root(cfg.data, "vqav2").glob("regions-pixels-*"))
    assert len(stores) == 1
    store = RegionStore(stores[0])
    assert store.feature_dim == 147 and len(store) == 96 + 24 + 24  # every image of every split
    assert store["1"].boxes.shape[0] == store["1"].features.shape[0] >= 2  # ground-truth boxes: 2–5 objects
    assert (store["1"].object_ids >= 0).all()  # labelled from the scene graph


def test_a_region_model_on_real_data_without_a_store_is_told_how_to_make_one(make_cfg, tmp_path, region_model):
    from vlbench.data.sources import resolve_data_root

    world = resolve_data_root(make_cfg().data, "vqav2")
    cfg = _as_region_model(
        make_cfg(
            "model=textonly",
            "data=vqav2",
            f"data.root={world}",
            "data.tokenizer=auto",
            "data.datasets.vqav2.image_template='images/{subtype}/COCO_{subtype}_{image_id:012d}.png'",
        )
    )
    with pytest.raises(VlbenchError, match=r"data.datasets.vqav2.region_features: not set .* vlbench-data extract"):
        run(cfg, tmp_path / "run")
