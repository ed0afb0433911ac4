"""Shared fixtures: a small synthetic world and the real config, composed and shrunk (the user's path, tiny)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)

SMALL_WORLD = ["data.images.train=96", "data.images.val=24", "data.images.test=24", "data.questions_per_image=3"]
FAST = [
    "trainer.max_steps=4",
    "trainer.batch_size=16",
    "trainer.eval_batch_size=64",
    "trainer.progress=false",
    "trainer.log_every=1",
]


@pytest.fixture(autouse=True, scope="session")
def no_runtime_thread_switch():
    """torch.set_num_threads in this process would slow every later test's attention (torch's CPU flash kernel runs
    ~2.7× slower after it, even with the same count: vlbench.bench_models.use_threads), ~15 % of the suite's time: a
    test that needs another thread count starts a process with OMP_NUM_THREADS instead."""
    import torch

    real, test_process = torch.set_num_threads, os.getpid()

    def refuse(count: int) -> None:
        if os.getpid() != test_process:  # a forked DataLoader worker sets its one thread, as torch's worker loop does
            return real(count)
        raise RuntimeError("torch.set_num_threads in the test process: start a subprocess with OMP_NUM_THREADS")

    torch.set_num_threads = refuse
    yield
    torch.set_num_threads = real


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vlbench-cache")
    os.environ["VLBENCH_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(cache_dir, tmp_path):
    """compose(overrides) → the real config at tiny scale on a small world, writing under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    *SMALL_WORLD,
                    *FAST,
                    f"data.cache_dir={cache_dir}",
                    f"results_dir={tmp_path}/runs",
                    *overrides,
                ],
            )
        return cfg

    return make


@pytest.fixture(scope="session")
def small_world(cache_dir) -> Path:
    from vlbench.data.synthetic import SyntheticConfig, ensure_world

    cfg = SyntheticConfig(images={"train": 96, "val": 24, "test": 24}, questions_per_image=3)
    return ensure_world(cfg, "vqav2", cache_dir)
