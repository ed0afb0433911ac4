"""ALBEF under two processes (gloo, CPU): queues gather every rank's momentum features in rank order and stay equal
across processes; the gather with gradients sends each rank the gradient of its own slice."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.models.test_albef import make_batch, tiny_albef
from vlbench.models.losses import all_gather_batch

WORLD = 2


def _worker(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = tiny_albef().train()  # the same weights on every rank (seeded)
        torch.manual_seed(100 + rank)  # a different batch per rank
        batch = make_batch(batch_size=3)
        batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
        batch["image_ids"] = torch.arange(3) + 10 * rank
        model.retrieval_losses(batch, step=0)
        with torch.no_grad():
            feat_m = model.momentum_model.encode_image(batch["pixel_values"])[1]
        x = torch.full((2, 4), float(rank + 1), requires_grad=True)
        all_gather_batch(x, with_grad=True).sum().backward()
        torch.save(
            {
                "image_queue": model.image_queue,
                "id_queue": model.id_queue,
                "ptr": model.queue_ptr,
                "feat_m": feat_m,
                "grad": x.grad,
                "plain_gather_requires_grad": all_gather_batch(x).requires_grad,
            },  # fmt: skip
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_queues_gather_all_ranks_and_agree(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert torch.equal(r0["image_queue"], r1["image_queue"]) and torch.equal(r0["id_queue"], r1["id_queue"])
    assert r0["ptr"].item() == 6  # 2 ranks × 3
    assert torch.allclose(r0["image_queue"][:, :3].t(), r0["feat_m"], atol=1e-6)  # rank 0's batch first
    assert torch.allclose(r0["image_queue"][:, 3:6].t(), r1["feat_m"], atol=1e-6)
    assert r0["id_queue"][:6].tolist() == [0, 1, 2, 10, 11, 12]
    # d/dx of (the sum over both ranks' losses): each rank's loss sums the gathered tensor once
    assert torch.equal(r0["grad"], torch.full((2, 4), float(WORLD))) and not r0["plain_gather_requires_grad"]
