"""The shared retrieval head's training loss (the metric and the evaluation have their own test files)."""

import torch


def test_shared_matching_negatives_come_from_the_step_generator_not_the_global_rng():
    """The negatives a run trains on must not depend on the device (CUDA's generator gives another stream for a
    seed): they are drawn from the model's batch shard, i.e. the runner's per-step CPU generator."""
    from types import SimpleNamespace

    from vlbench.models.base import VisionLanguageModel
    from vlbench.models.global_batch import BatchShard
    from vlbench.tasks.retrieval import SharedMatchHead, shared_matching_loss

    class Recorder(VisionLanguageModel):  # no unimodal tokens: every pair goes through encode
        def __init__(self):
            super().__init__()
            self.generator = torch.Generator()

        def batch_shard(self, size: int) -> BatchShard:
            return BatchShard.of(size, training=True, generator=self.generator)

        def encode(self, pairs):
            self.pairs = pairs["input_ids"][:, 0].tolist()
            return SimpleNamespace(pooled=torch.zeros(len(pairs["input_ids"]), 8))

    batch = {
        "input_ids": torch.arange(6)[:, None].repeat(1, 3),
        "attention_mask": torch.ones(6, 3, dtype=torch.long),
        "pixel_values": torch.zeros(6, 3, 4, 4),
        "image_ids": torch.tensor([0, 0, 1, 2, 3, 4]),
        "group_ids": torch.zeros(6, dtype=torch.long),
    }
    model, head, seen = Recorder(), SharedMatchHead(8, 0.0), []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model.generator.manual_seed(7)
        assert torch.isfinite(shared_matching_loss(model, head, batch)["itm"])
        seen.append(model.pairs)
    assert seen[0] == seen[1]
    negative_texts = seen[0][6:12]
    assert all(batch["image_ids"][t] != batch["image_ids"][i] for i, t in enumerate(negative_texts))
