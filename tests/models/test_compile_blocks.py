"""``trainer.compile_scope=blocks``: each transformer block compiled for training, one compiled function per kind of
block. Traced here with dynamo's eager backend (tracing without code generation: seconds, not minutes): training
through the compiled blocks gives eager's losses and gradients, no graph breaks, and — over steps whose masked
counts and text lengths differ — no recompilation after the first steps (the whole-forward scope recompiles at the
masking code's data-dependent shapes until dynamo's limit)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from tests.tasks.test_retrieval_cache import _model_and_batch
from vlbench.models.layers import compile_transformer_blocks, transformer_blocks

FAMILIES = ["albef", "lxmert", "pixelbert", "unimo3"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean dynamo cache, and hitting its recompilation limit fails (it would silently run the block eager)."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _pretraining_step(model, batch, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    if model.ctx.sample_generator is not None:
        model.ctx.sample_generator.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    losses = model.pretrain_losses(batch, step=seed)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}


def _shorter_text(batch: dict, length: int) -> dict:
    """The batch with its captions cut to ``length`` tokens (a batch of another text length)."""
    return {**batch, "input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_blocks_train_as_eager_without_graph_breaks_or_steady_recompilation(name):
    model, batch = _model_and_batch(name)
    batch = {**batch, "image_ids": torch.arange(batch["input_ids"].shape[0])}
    eager, compiled = model.train(), copy.deepcopy(model).train()  # ALBEF's queues move: both start alike
    assert compile_transformer_blocks(compiled, backend="eager") == len(transformer_blocks(compiled)) > 1
    length = batch["input_ids"].shape[1]
    batches = [batch, batch, _shorter_text(batch, length - 2), batch, _shorter_text(batch, length - 1)]
    graphs = []
    for seed, step_batch in enumerate(batches):  # another seed: other masked words and regions, other counts
        losses, grads = _pretraining_step(compiled, step_batch, seed)
        expected_losses, expected_grads = _pretraining_step(eager, step_batch, seed)
        assert losses.keys() == expected_losses.keys()
        for key in losses:
            torch.testing.assert_close(losses[key], expected_losses[key], atol=1e-6, rtol=1e-5, msg=key)
        assert grads.keys() == expected_grads.keys()
        for key, grad in grads.items():
            if expected_grads[key] is None:
                assert grad is None, key
            else:
                torch.testing.assert_close(grad, expected_grads[key], atol=1e-6, rtol=1e-5, msg=key)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the blocks ran compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    # after the first step of another text length, new masked counts and lengths reuse the graphs (dynamic sizes)
    assert graphs[-1] == graphs[2], graphs


def test_evaluation_and_no_grad_forwards_run_the_eager_blocks():
    model, batch = _model_and_batch("albef")
    compile_transformer_blocks(model, backend="eager")
    model.eval()
    model.pretrain_losses(batch, step=0)  # eval mode: eager
    model.train()
    with torch.no_grad():
        model.pretrain_losses(batch, step=0)  # no gradients (the momentum encoders' case): eager
    assert counters["stats"]["unique_graphs"] == 0
    model.pretrain_losses(batch, step=0)
    assert counters["stats"]["unique_graphs"] > 0


def test_compiled_blocks_keep_their_keys_and_deep_copies_call_their_own_weights():
    model, batch = _model_and_batch("lxmert")
    keys = list(model.state_dict())
    compile_transformer_blocks(model, backend="eager")
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    for block, copied in zip(transformer_blocks(model), transformer_blocks(twin), strict=True):
        assert block.forward.__self__ is block and copied.forward.__self__ is copied
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    torch.manual_seed(0)
    ours = model.train().pretrain_losses(batch, step=0)
    torch.manual_seed(0)
    theirs = twin.train().pretrain_losses(batch, step=0)
    assert not torch.allclose(ours["mlm"], theirs["mlm"])


def test_a_compiled_forward_draws_the_shards_numbers_eager_at_any_text_length():
    """``trainer.compile_scope=forward`` compiles the masking code too: its draws are eager's, from the global RNG
    or a generator, also once the text length is a dynamic size (dynamo failed there on ``torch.rand``)."""
    from vlbench.models.global_batch import BatchShard

    def masked_draws(ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return BatchShard(ids.shape[0], generator=generator).uniform(ids.shape[1], 3, device=ids.device) * 2.0

    compiled = torch.compile(masked_draws, backend="eager")
    for length in (6, 7, 9):  # the second length makes it dynamic
        for seeded in (False, True):
            results = []
            for fn in (compiled, masked_draws):
                torch.manual_seed(length)
                results.append(fn(torch.zeros(4, length), torch.Generator().manual_seed(3) if seeded else None))
            torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_compiled_blocks_under_activation_checkpointing_train_as_eager():
    """With ``trainer.activation_checkpointing`` the compiled function is the checkpointed forward."""
    from vlbench.models.layers import checkpoint_transformer_blocks

    model, batch = _model_and_batch("albef")
    eager, compiled = model.train(), copy.deepcopy(model).train()
    checkpoint_transformer_blocks(compiled)
    compile_transformer_blocks(compiled, backend="eager")
    losses, grads = _pretraining_step(compiled, batch, seed=3)
    expected_losses, expected_grads = _pretraining_step(eager, batch, seed=3)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    for key in expected_losses:
        torch.testing.assert_close(losses[key], expected_losses[key], atol=1e-6, rtol=1e-5, msg=key)
    for key, grad in expected_grads.items():
        if grad is not None:
            torch.testing.assert_close(grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)
