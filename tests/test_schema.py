"""vlbench/schema.py: keys added with `+` are checked against the schemas; real configs and free-form nodes pass."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)
from tests.test_cli import TRAINER_KEYS
from vlbench.errors import VlbenchError
from vlbench.schema import SCHEMAS, check_known_keys

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


def composed(*overrides: str) -> DictConfig:
    """The whole config as the app's callbacks see it: Hydra's own node included."""
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", sorted(SCHEMAS["model"]))
@pytest.mark.parametrize("scale", ["tiny", "base"])
def test_every_model_and_scale_passes(model, scale):
    check_known_keys(composed(f"model={model}", f"scale={scale}"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes(experiment):
    check_known_keys(composed(f"+experiment={experiment}"))


def test_dict_fields_take_any_key():
    """Free-form by the schema: dicts of named entries and keyword arguments."""
    check_known_keys(
        composed(
            "model=pixelbert",
            "+model.cnn_kwargs.layers=[1,1,1,1]",
            "task=pretrain",
            "+task.loss_weights.itm=2.0",
            "+data.images.restval=10",
            "+hydra.job.env_set.SOME_VARIABLE=1",
        )
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_stepz=5", f"unknown config key 'trainer.max_stepz' (known keys of trainer: {TRAINER_KEYS})"),
        ("+model.typo=3", "unknown config key 'model.typo' (known keys of model: alpha, alpha_warmup_epochs,"),
        ("+model.text.hidden=3", "unknown config key 'model.text.hidden' (known keys of model.text: dropout, "),
        ("+data.datasets.vqav2.subdri=x", "unknown config key 'data.datasets.vqav2.subdri' (known keys of data.data"),
        ("+nosuchkey=1", "unknown config key 'nosuchkey' (known keys at the top level: data, deterministic, head,"),
    ],
)
def test_unknown_keys_added_with_plus_are_refused(override, message):
    with pytest.raises(VlbenchError) as error:
        check_known_keys(composed(override))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_family_key_on_another_family_is_refused():
    """Each model family's schema is its own: LXMERT's layer counts are not ALBEF's."""
    check_known_keys(composed("model=lxmert", "model.l_layers=2"))
    with pytest.raises(VlbenchError, match=r"unknown config key 'model.l_layers' \(known keys of model: alpha,"):
        check_known_keys(composed("model=albef", "+model.l_layers=2"))
