"""The task base: the evaluation loader that every task's ``predict_split`` iterates."""

import os

import torch
from torch.utils.data import Dataset

from vlbench.tasks.base import EvalContext


class PidDataset(Dataset):
    """Each item says which process loaded it."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, os.getpid()

    def collate(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor([i for i, _ in items]), "pid": torch.tensor([p for _, p in items])}


def passes(ctx: EvalContext, dataset: Dataset) -> list[list[dict[str, torch.Tensor]]]:
    return [list(ctx.loader(dataset)) for _ in range(2)]


def test_evaluation_loader_is_kept_per_dataset_and_its_workers_persist():
    dataset, other = PidDataset(), PidDataset()
    ctx = EvalContext(device=torch.device("cpu"), batch_size=4, num_workers=2)
    assert ctx.loader(dataset) is ctx.loader(dataset) and ctx.loader(other) is not ctx.loader(dataset)
    assert ctx.loader(dataset).persistent_workers and not ctx.loader(dataset).pin_memory
    first, second = passes(ctx, dataset)
    assert [b["index"].tolist() for b in first] == [b["index"].tolist() for b in second] == [[0, 1, 2, 3], [4, 5]]
    workers = {p for b in first for p in b["pid"].tolist()}
    assert os.getpid() not in workers and workers == {p for b in second for p in b["pid"].tolist()}
    in_process = EvalContext(device=torch.device("cpu"), batch_size=4)
    assert not in_process.loader(dataset).persistent_workers  # no workers: nothing to keep
    state = torch.get_rng_state()
    passes(in_process, dataset)
    assert torch.equal(torch.get_rng_state(), state)  # evaluating draws nothing from the training RNG
