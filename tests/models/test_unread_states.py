"""``trainer.skip_unread_states``: where a head reads only the pooled [CLS], the last fused layer computes [CLS] alone;
where a pre-training loss reads some positions (masked words, labelled regions, [CLS]), it computes those alone.
The same function — the pooled output, the losses and every gradient equal the full computation's up to float
rounding — and the token states are None rather than wrong, so a reader of them fails loudly."""

import copy

import pytest
import torch
from torch import nn

from tests.models.test_layers import SIZES
from tests.tasks.test_retrieval_cache import _model_and_batch
from vlbench.models.base import JointEncoding, VisionLanguageModel, encode_for, pooled_only_for
from vlbench.models.layers import (
    PooledMLPHead,
    ReadPositions,
    TextEncoder,
    TransformerLayer,
    TransformerStack,
)
from vlbench.tasks.answers import SharedAnswerHead
from vlbench.tasks.nlvr2 import PairClassifierHead
from vlbench.tasks.retrieval import SharedMatchHead, shared_matching_loss

FAMILIES = ["albef", "lxmert", "pixelbert", "unimo3"]


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, msg=msg)


def _layer_with_padded_inputs():
    """A layer with cross-attention and its inputs: padding in both the stream's and the context's masks."""
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES, cross_attention_size=24).eval()
    x, context = torch.randn(3, 7, 32), torch.randn(3, 5, 24)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, -3:] = 0
    context_mask = torch.ones(3, 5, dtype=torch.long)
    context_mask[1, -2:] = 0
    return layer, x, mask, context, context_mask


def test_a_layer_computes_its_first_position_alone_as_the_full_layer_does():
    layer, x, mask, context, context_mask = _layer_with_padded_inputs()
    full = layer(x, mask, context, context_mask)
    first = layer(x, mask, context, context_mask, first_token_only=True)
    assert first.shape == (3, 1, 32)
    close(first, full[:, :1])
    # the query reads every position: changing another token changes [CLS]'s output
    other = x.clone()
    other[:, 3] += 1.0
    assert not torch.allclose(layer(other, mask, context, context_mask, first_token_only=True), first)
    with pytest.raises(ValueError, match="causal"):
        layer(x, mask, context, context_mask, causal=True, first_token_only=True)


def test_a_stack_prunes_its_last_layer_only():
    torch.manual_seed(0)
    stack, encoder = TransformerStack(SIZES, 3).eval(), TextEncoder(50, SIZES, 2).eval()
    x, ids = torch.randn(2, 6, 32), torch.randint(5, 50, (2, 6))
    close(stack(x, first_token_only=True), stack(x)[:, :1])
    mask = torch.ones_like(ids)
    close(encoder(ids, mask, first_token_only=True), encoder(ids, mask)[:, :1])


def test_read_positions_list_the_chosen_rows_in_order_padded_with_position_zero():
    chosen = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    read = ReadPositions.of(chosen)
    assert read.index.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert read.picked.tolist() == [[True, True], [False, False], [True, False]]
    with_first = ReadPositions.of(chosen, keep_first=True)
    assert with_first.index.tolist() == [[0, 1, 3], [0, 0, 0], [0, 0, 0]]
    assert with_first.picked.tolist() == [[False, True, True], [False, False, False], [True, False, False]]
    states = torch.arange(12.0).view(3, 4, 1)
    for positions in (read, with_first):
        gathered = states.gather(1, positions.index[..., None])
        assert torch.equal(gathered[positions.picked], states[chosen])
    nothing = ReadPositions.of(torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.index.shape == (2, 1) and not nothing.picked.any()


def test_a_layer_and_a_stack_compute_chosen_positions_alone_as_the_full_ones_do():
    layer, x, mask, context, context_mask = _layer_with_padded_inputs()
    chosen = torch.zeros(3, 7, dtype=torch.bool)
    chosen[0, [1, 2]], chosen[2, [0, 4, 6]] = True, True
    read = ReadPositions.of(chosen)
    some = layer(x, mask, context, context_mask, query_positions=read.index)
    assert some.shape == (3, 3, 32)
    close(some[read.picked], layer(x, mask, context, context_mask)[chosen])
    with pytest.raises(ValueError, match="causal"):
        layer(x, mask, causal=True, query_positions=read.index)
    stack = TransformerStack(SIZES, 3).eval()
    close(stack(x[..., :32], mask, query_positions=read.index)[read.picked], stack(x, mask)[chosen])


def _last_layer_rows(model: nn.Module) -> list[int]:
    """A hook that records how many rows each feed-forward of the model's transformer layers computes."""
    rows: list[int] = []
    for layer in model.modules():
        if isinstance(layer, TransformerLayer):
            layer.intermediate.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    return rows


@pytest.mark.parametrize("name", [*FAMILIES, "lxmert_masked_labels"])
def test_pretraining_losses_and_gradients_are_the_full_computations(name):
    """Each family's pre-training objectives read some positions of the last fused layer (MLM: the masked words;
    LXMERT: [CLS], the masked words, the labelled regions; Pixel-BERT: [CLS] and the masked words; UNIMO-3's MLM
    pass: no vision state at all): the same losses and every parameter's gradient as computing every state, and
    fewer rows computed."""
    if name == "lxmert_masked_labels":
        from tests.models.test_lxmert import make_batch, tiny_lxmert

        model, batch = tiny_lxmert(label_all_regions=False).eval(), make_batch(batch_size=4)
    else:
        model, batch = _model_and_batch(name)
    batch = {**batch, "image_ids": torch.arange(batch["input_ids"].shape[0])}
    results = {}
    for skip in (False, True):
        net = copy.deepcopy(model)  # ALBEF's queues move on each call: both variants start from the same state
        net.skip_unread_states = skip
        rows = _last_layer_rows(net)
        torch.manual_seed(5)
        if net.ctx.sample_generator is not None:
            net.ctx.sample_generator.manual_seed(5)
        losses = net.pretrain_losses(batch, step=0)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        results[skip] = losses, grads, sum(rows)
    (losses, grads, rows), (full_losses, full_grads, full_rows) = results[True], results[False]
    assert losses.keys() == full_losses.keys() and len(losses) >= 2
    for key in full_losses:
        close(losses[key], full_losses[key], msg=key)
    assert grads.keys() == full_grads.keys() and len(full_grads) > 20
    for key in full_grads:
        close(grads[key], full_grads[key], msg=key)
    assert rows < full_rows


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_encodes_the_same_pooled_output_with_and_without_tokens(name):
    model, batch = _model_and_batch(name)
    assert model.encodes_pooled_only
    with torch.no_grad():
        full, pooled_only = model.encode(batch), model.encode(batch, pooled_only=True)
        assert full.tokens is not None and pooled_only.tokens is None
        close(pooled_only.pooled, full.pooled)
        text_keys = ("input_ids", "attention_mask")
        cached = {k: v for k, v in batch.items() if k not in model.inputs_replaced_by_tokens}
        cached.update(model.unimodal_tokens({k: v for k, v in batch.items() if k not in text_keys}))
        cached.update(model.unimodal_tokens({k: batch[k] for k in text_keys}))
        from_tokens = model.encode_from_tokens(cached, pooled_only=True)
        assert from_tokens.tokens is None
        close(from_tokens.pooled, full.pooled)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_of_a_pooled_head_are_the_full_computations(name):
    """Every parameter that gets a gradient through the pooled output gets the same one (and no other parameter
    gets one): what the last layer leaves out fed nothing the head reads."""
    model, batch = _model_and_batch(name)  # evaluation mode: no dropout or pixel sampling, the same draws both ways
    torch.manual_seed(0)
    head = SharedAnswerHead(model.hidden_size, 7, multiplier=2, dropout=0.0)
    targets = torch.randint(0, 7, (batch["input_ids"].shape[0],))

    def grads(skip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        model.skip_unread_states = skip
        loss = nn.functional.cross_entropy(head(encode_for(model, head, batch), batch), targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, pruned), (full_loss, full) = grads(True), grads(False)
    close(loss, full_loss)
    assert pruned.keys() == full.keys() and len(full) > 20
    for key in full:
        close(pruned[key], full[key], msg=key)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_models_own_matching_scores_and_text_embeddings_are_the_same_when_skipping(name):
    model, batch = _model_and_batch(name)
    with torch.no_grad():
        model.skip_unread_states = False
        full, full_text = model.match_scores(batch), model.embed_text(batch)
        model.skip_unread_states = True
        close(model.match_scores(batch), full)
        close(model.embed_text(batch), full_text)


@pytest.mark.parametrize("name", ["albef", "unimo3", "pixelbert"])
def test_matching_objectives_are_the_same_when_skipping(name):
    """ITM inside the models' own retrieval objectives (ALBEF, UNIMO-3: positives and hard negatives fused;
    Pixel-BERT: the ranking over negatives) reads the fused [CLS] alone: the same losses either way."""
    model, batch = _model_and_batch(name)
    batch = {**batch, "image_ids": torch.arange(batch["input_ids"].shape[0])}
    losses = {}
    for skip in (False, True):
        model.skip_unread_states = skip
        torch.manual_seed(5)
        if model.ctx.sample_generator is not None:
            model.ctx.sample_generator.manual_seed(5)
        with torch.no_grad():
            losses[skip] = model.retrieval_losses(batch, step=0)
    assert losses[True].keys() == losses[False].keys()
    for key in losses[False]:
        close(losses[True][key], losses[False][key], msg=key)


def test_the_shared_matching_loss_fuses_the_cls_alone_when_allowed():
    model, batch = _model_and_batch("unimo3")
    batch = {**batch, "image_ids": torch.arange(4), "group_ids": torch.arange(4)}
    head = SharedMatchHead(model.hidden_size, dropout=0.0)
    seen = []
    fuse = model.fuse

    def recording_fuse(*args, **options):
        fused = fuse(*args, **options)
        seen.append(fused.text.shape[1])
        return fused

    model.fuse = recording_fuse
    losses = {}
    for skip in (False, True):
        model.skip_unread_states = skip
        torch.manual_seed(3)
        losses[skip] = shared_matching_loss(model, head, batch)["itm"]
    assert seen == [8, 1]  # the whole text stream, then [CLS] alone
    close(losses[True], losses[False])


class PluginModel(VisionLanguageModel):
    """A user's model written before the flag existed: ``encode(batch)`` only."""

    hidden_size = 4

    def encode(self, batch):
        return JointEncoding(pooled=torch.ones(2, 4), tokens=torch.ones(2, 3, 4), mask=torch.ones(2, 3))


def test_who_may_skip_head_model_and_run_all_must_allow_it():
    ours = _model_and_batch("unimo3")[0]
    pooled_heads = [SharedAnswerHead(8, 3, 2, 0.0), PairClassifierHead(8, 0.0), SharedMatchHead(8, 0.0)]
    pooled_heads.append(PooledMLPHead(8, 3))
    ours.skip_unread_states = True
    assert all(pooled_only_for(ours, head) for head in pooled_heads)
    assert not pooled_only_for(ours, nn.Linear(2, 2))  # a head that does not say so may read the tokens
    ours.skip_unread_states = False  # trainer.skip_unread_states=false
    assert not any(pooled_only_for(ours, head) for head in pooled_heads)
    plugin = PluginModel()
    plugin.skip_unread_states = True
    assert not pooled_only_for(plugin, pooled_heads[0])
    assert encode_for(plugin, pooled_heads[0], {}).tokens.shape == (2, 3, 4)  # called as it was written


def test_the_text_only_baseline_skips_too():
    from omegaconf import OmegaConf

    from vlbench.models.base import ModelContext
    from vlbench.models.textonly import TextOnly
    from vlbench.schema import TextOnlyModelConfig

    cfg = OmegaConf.structured(TextOnlyModelConfig)
    cfg.merge_with({"text": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "dropout": 0.0}})
    ctx = ModelContext(vocab_size=50, pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4, image_size=32)
    torch.manual_seed(0)
    model = TextOnly(cfg, ctx).eval()
    batch = {"input_ids": torch.randint(5, 50, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    full, pooled_only = model.encode(batch), model.encode(batch, pooled_only=True)
    assert pooled_only.tokens is None
    close(pooled_only.pooled, full.pooled)


@pytest.mark.parametrize("skip", [True, False])
def test_a_run_encodes_for_its_shared_head_as_the_switch_says(make_cfg, tmp_path, monkeypatch, skip):
    from vlbench.models.textonly import TextOnly
    from vlbench.runner import run

    calls = []
    encode = TextOnly.encode

    def recording_encode(self, batch, **options):
        calls.append(options.get("pooled_only", False))
        return encode(self, batch, **options)

    monkeypatch.setattr(TextOnly, "encode", recording_encode)
    run(make_cfg("model=textonly", "trainer.max_steps=2", f"trainer.skip_unread_states={skip}"), tmp_path / "run")
    assert len(calls) > 2 and set(calls) == {skip}  # training steps and evaluation alike
