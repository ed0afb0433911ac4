"""Pixel-BERT: shapes of the encoding and every head, random pixel sampling (count, randomness, when it applies),
MLM/ITM pre-training (finite, learnable, gradients reach the CNN and every parameter), local CNN weights."""

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file

from vlbench.errors import VlbenchError
from vlbench.models.base import ModelContext, ModelObjectives
from vlbench.models.global_batch import BatchShard
from vlbench.models.pixelbert import PixelBERT, sample_pixels
from vlbench.schema import PixelBertModelConfig

VOCAB, IMAGE, HIDDEN, SAMPLE = 50, 64, 32, 5
CTX = ModelContext(vocab_size=VOCAB, pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4, image_size=IMAGE)
CNN = {"cnn": "resnet18", "cnn_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}}
PIXELS = (IMAGE // 16) ** 2  # cnn_out_index 3: stride 16 → a 4 × 4 map
PRETRAIN_HEADS = ("mlm_head.", "itm_head.")  # trained by pre-training only: no gradient from a task head's loss


def tiny_pixelbert(**overrides) -> PixelBERT:
    cfg = OmegaConf.structured(PixelBertModelConfig)
    cfg.merge_with(
        {
            **CNN,
            "cnn_out_index": 3,
            "text": {"hidden_size": HIDDEN, "num_heads": 2, "intermediate_size": 64, "dropout": 0.0},
            "num_layers": 2,
            "pixel_sample": SAMPLE,
            "retrieval_negatives": 2,
        },
        overrides,
    )
    torch.manual_seed(0)
    return PixelBERT(cfg, CTX)


def make_batch(batch_size: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = CTX.cls_token_id, CTX.sep_token_id
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded caption
    ids[0, -2:] = CTX.pad_token_id
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g),
        "image_ids": torch.arange(batch_size) // 2,  # two captions per image
    }


def encoder_lengths(model: PixelBERT, run) -> list[int]:
    """Sequence lengths the transformer saw while ``run()`` ran."""
    seen = []
    handle = model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return seen


def assert_all_grads(model: PixelBERT, loss: torch.Tensor, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith(exclude)}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient: {missing[:8]}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    return grads


def test_encode_shapes_and_joint_mask():
    model = tiny_pixelbert().eval()
    enc = model.encode(make_batch())
    assert enc.pooled.shape == (4, HIDDEN) and enc.tokens.shape == (4, 7 + PIXELS, HIDDEN)
    assert enc.mask.shape == (4, 7 + PIXELS) and enc.mask[:, 7:].all() and not enc.mask[0, 5:7].any()
    assert enc.pooled.abs().max() <= 1  # BERT pooler: tanh


def test_every_native_head():
    model = tiny_pixelbert().eval()
    batch = make_batch()
    enc = model.encode(batch)
    assert model.native_head("answer_classifier", 6)(enc, batch).shape == (4, 6)
    assert model.native_head("pair_classifier", 2)([enc, model.encode(batch)], batch).shape == (4, 2)
    assert isinstance(model.native_head("image_text_matcher", 2), ModelObjectives)
    assert isinstance(model.native_head("pretrain", 0), ModelObjectives)
    assert model.native_head("text_assignment", 3) is None
    scores = model.match_scores(batch)
    assert scores.shape == (4,)
    text = {k: batch[k] for k in ("input_ids", "attention_mask")}
    cached = {**model.unimodal_tokens(batch), **text}
    assert model.unimodal_tokens(text) == {}
    torch.testing.assert_close(model.match_scores_from_tokens(cached), scores)


def test_sample_pixels_count_randomness_and_independence():
    index = torch.arange(16.0)[None, :, None].expand(3, 16, 2)  # token n holds n: the draw can be read back
    torch.manual_seed(0)
    first, second = sample_pixels(index, 6), sample_pixels(index, 6)
    assert first.shape == (3, 6, 2)
    picked = [set(first[b, :, 0].tolist()) for b in range(3)]
    assert all(len(p) == 6 for p in picked)  # without replacement
    assert picked[0] != picked[1] or picked[1] != picked[2]  # each image draws for itself
    assert picked != [set(second[b, :, 0].tolist()) for b in range(3)]  # redrawn at every call
    counts = torch.zeros(16)
    for _ in range(400):
        counts += torch.bincount(sample_pixels(index, 4)[0, :, 0].long(), minlength=16)
    assert counts.min() > 0.6 * counts.mean()  # uniform over pixels
    assert torch.equal(sample_pixels(index, 16), index)


def test_sampling_only_in_training_pretraining_by_default():
    batch = make_batch()
    model = tiny_pixelbert()
    assert encoder_lengths(model.train(), lambda: model.pretrain_losses(batch, 0)) == [7 + SAMPLE]
    assert encoder_lengths(model, lambda: model.encode(batch)) == [7 + PIXELS]  # fine-tuning: every pixel
    with torch.no_grad():
        assert encoder_lengths(model.eval(), lambda: model.pretrain_losses(batch, 0)) == [7 + PIXELS]
    finetune = tiny_pixelbert(pixel_sample_in_finetune=True)
    assert finetune.train().encode(batch).tokens.shape[1] == 7 + SAMPLE
    assert finetune.eval().encode(batch).tokens.shape[1] == 7 + PIXELS
    off = tiny_pixelbert(pixel_sample=None).train()
    assert encoder_lengths(off, lambda: off.pretrain_losses(batch, 0)) == [7 + PIXELS]


def test_pretraining_sampled_pixels_differ_between_steps():
    model = tiny_pixelbert().train()
    pixels = make_batch()["pixel_values"]
    full = model.pixel_embeddings(pixels)  # train-mode BatchNorm: the same batch gives the same tokens

    def drawn() -> list[set[int]]:
        tokens = model.pixel_tokens(pixels, sample=True)  # (B, SAMPLE, H)
        match = (tokens[:, :, None] - full[:, None]).abs().sum(-1).argmin(-1)  # index of each sampled token
        return [set(row.tolist()) for row in match]

    torch.manual_seed(0)
    draws = [drawn() for _ in range(3)]
    assert all(len(s) == SAMPLE for draw in draws for s in draw)
    assert draws[0] != draws[1] != draws[2]
    assert any(len({frozenset(s) for s in draw}) > 1 for draw in draws)  # images draw independently


def test_pretrain_losses_finite_and_every_parameter_trains():
    model = tiny_pixelbert(pixel_position="learned_2d").train()
    torch.manual_seed(0)
    losses = model.pretrain_losses(make_batch(batch_size=6), step=0)
    assert set(losses) == {"mlm", "itm"} and all(torch.isfinite(v) for v in losses.values())
    grads = assert_all_grads(model, sum(losses.values()))
    assert grads["pixel_embeddings.cnn.conv1.weight"].abs().sum() > 0  # end to end: the CNN learns
    assert grads["pixel_embeddings.visual_type"].abs().sum() > 0 and grads["pixel_embeddings.rows.weight"].abs().sum()


def test_task_head_loss_reaches_every_parameter_but_the_pretraining_heads():
    model = tiny_pixelbert().train()
    batch = make_batch()
    head = model.native_head("answer_classifier", 5)
    loss = F.binary_cross_entropy_with_logits(head(model.encode(batch), batch), torch.rand(4, 5))
    grads = assert_all_grads(model, loss, exclude=PRETRAIN_HEADS)
    # timm zero-initialises each residual branch's last BatchNorm: its gamma learns first, the convs behind it next
    assert grads["pixel_embeddings.cnn.layer3.0.bn2.weight"].abs().sum() > 0
    assert grads["pixel_embeddings.cnn.layer3.0.downsample.0.weight"].abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_retrieval_ranking_loss_trains_the_match_head():
    model = tiny_pixelbert().train()
    torch.manual_seed(0)
    losses = model.retrieval_losses(make_batch(), step=0)
    assert set(losses) == {"itm_rank"} and torch.isfinite(losses["itm_rank"])
    assert_all_grads(model, losses["itm_rank"], exclude=("mlm_head.",))
    one_image = dict(make_batch(), image_ids=torch.zeros(4, dtype=torch.long))  # falls back to any other caption
    assert torch.isfinite(model.retrieval_losses(one_image, step=0)["itm_rank"])
    with pytest.raises(VlbenchError, match="at least 2 captions"):
        model.retrieval_losses({k: v[:1] for k, v in make_batch().items()}, step=0)


def test_mlm_counts_matched_pairs_only():
    model = tiny_pixelbert(matching_probability=1.0).train()  # every pair with distinct images is mismatched
    batch = make_batch(batch_size=4)
    assert model.pretrain_losses(batch, step=0)["mlm"].item() == 0.0
    everywhere = tiny_pixelbert(matching_probability=1.0, mlm_matched_only=False).train()
    torch.manual_seed(0)
    assert everywhere.pretrain_losses(make_batch(batch_size=4, length=20), step=0)["mlm"].item() > 0


def test_a_few_steps_on_a_fixed_batch_lower_the_pretraining_loss():
    model = tiny_pixelbert().train()
    batch = make_batch(batch_size=6, length=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)

    def loss_at_fixed_corruption() -> torch.Tensor:
        torch.manual_seed(3)  # the same pixels, mismatches and masks at every step
        return sum(model.pretrain_losses(batch, step=0).values())

    first = loss_at_fixed_corruption()
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_at_fixed_corruption()
        loss.backward()
        optimizer.step()
    assert loss_at_fixed_corruption().item() < 0.7 * first.item()


def test_cnn_init_loads_a_local_timm_state_dict(tmp_path):
    torch.manual_seed(7)
    reference = timm.create_model("resnet18", pretrained=False, **CNN["cnn_kwargs"])  # full net: layer4 and fc too
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    cnn = tiny_pixelbert(cnn_init=str(path)).pixel_embeddings.cnn
    theirs = reference.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in cnn.state_dict().items())

    with pytest.raises(VlbenchError, match=r"model.cnn_init=.*nowhere.pt: no such file") as missing_file:
        tiny_pixelbert(cnn_init=str(tmp_path / "nowhere.pt"))
    wider = timm.create_model("resnet18", pretrained=False, **dict(CNN["cnn_kwargs"], channels=[8, 16, 48, 64]))
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, tmp_path / "wider.safetensors")
    with pytest.raises(VlbenchError, match=r"cnn_init=.*tensors of another shape: layer3.0.conv1.weight") as wrong:
        tiny_pixelbert(cnn_init=str(tmp_path / "wider.safetensors"))
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(VlbenchError, match=r"model.cnn_init=.*tensors are missing \(conv1.weight") as partial:
        tiny_pixelbert(cnn_init=str(tmp_path / "other.safetensors"))
    assert all("\n" not in str(e.value) for e in (missing_file, wrong, partial))


def test_batchnorm_pixel_tokens_survive_a_shared_offset_that_collapses_layernorm_ones():
    """The collapse seen in training (models/pixelbert.py, pixel_norm): a large part every pixel token shares (here
    added to the projection's bias) leaves LayerNorm'd tokens nearly one vector; BatchNorm'd ones keep every channel
    at unit variance over the batch's images and pixels."""
    pixels = make_batch()["pixel_values"]
    spread = {}
    for norm in ("batchnorm", "layernorm"):
        embeddings = tiny_pixelbert(pixel_norm=norm).pixel_embeddings.train()
        with torch.no_grad():
            before = embeddings(pixels)
            embeddings.proj.bias.add_(torch.linspace(-20.0, 20.0, HIDDEN))
            after = embeddings(pixels)
        spread[norm] = (before.flatten(0, 1).std(0).mean(), after.flatten(0, 1).std(0).mean())
        assert before.shape == (4, PIXELS, HIDDEN)
    torch.testing.assert_close(spread["batchnorm"][1], spread["batchnorm"][0])
    assert spread["batchnorm"][1] > 0.9
    assert spread["layernorm"][1] < 0.1 * spread["layernorm"][0]
    layernorm_model = tiny_pixelbert(pixel_norm="layernorm").eval()
    assert layernorm_model.encode(make_batch()).tokens.shape == (4, 7 + PIXELS, HIDDEN)


def test_bad_configuration_fails_clearly():
    with pytest.raises(VlbenchError, match="model.pixel_position='sinusoid'"):
        tiny_pixelbert(pixel_position="sinusoid")
    with pytest.raises(VlbenchError, match="model.pixel_norm='groupnorm': expected one of"):
        tiny_pixelbert(pixel_norm="groupnorm")
    with pytest.raises(VlbenchError, match="model.pixel_sample=0"):
        tiny_pixelbert(pixel_sample=0)
    with pytest.raises(VlbenchError, match="model.cnn=no_such_net"):
        tiny_pixelbert(cnn="no_such_net")
    with pytest.raises(VlbenchError, match="model.init_std=0.0: expected a positive"):
        tiny_pixelbert(init_std=0.0)


def test_init_std_sets_the_transformers_initial_scale_and_leaves_the_cnns():
    default, wide = tiny_pixelbert(), tiny_pixelbert(init_std=0.2)
    for name in ("encoder.layer.0.attention.query.weight", "pooler.weight", "embeddings.word_embeddings.weight",
                 "pixel_embeddings.proj.weight", "itm_head.weight"):  # fmt: skip
        assert dict(default.named_parameters())[name].std().item() == pytest.approx(0.02, rel=0.2), name
        assert dict(wide.named_parameters())[name].std().item() == pytest.approx(0.2, rel=0.2), name
    assert wide.pixel_embeddings.visual_type.std().item() == pytest.approx(0.2, rel=0.3)
    cnn_default, cnn_wide = default.pixel_embeddings.cnn.state_dict(), wide.pixel_embeddings.cnn.state_dict()
    assert all(torch.equal(cnn_default[k], cnn_wide[k]) for k in cnn_default)  # timm's own init, same seed


def test_a_stem_width_timm_would_ignore_is_an_error():
    # timm's ResNet builds its 7×7 stem 64 wide whatever stem_width says (used by deep stems only): fail, not widen
    kwargs = CNN["cnn_kwargs"]
    with pytest.raises(VlbenchError, match=r"stem_width=16: the .* first convolution of 64 channels .*stem_type=deep"):
        tiny_pixelbert(cnn_kwargs={**kwargs, "stem_width": 16})
    deep = tiny_pixelbert(cnn_kwargs={**kwargs, "stem_type": "deep", "stem_width": 16})
    assert deep.pixel_embeddings.cnn.conv1[0].out_channels == 16
    tiered = tiny_pixelbert(cnn_kwargs={**kwargs, "stem_type": "deep_tiered", "stem_width": 16})
    assert tiered.pixel_embeddings.cnn.conv1[0].out_channels == 12


def test_channels_last_cnn_computes_what_the_contiguous_one_does():
    fast, plain = tiny_pixelbert(channels_last=True), tiny_pixelbert(channels_last=False)
    convs = [m for m in fast.pixel_embeddings.cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(m.weight.is_contiguous() for m in plain.pixel_embeddings.cnn.modules() if isinstance(m, torch.nn.Conv2d))
    batch = make_batch()
    for mode in ("train", "eval"):  # BatchNorm: batch statistics, then running ones
        fast.train(mode == "train"), plain.train(mode == "train")
        a, b = fast.encode(batch), plain.encode(batch)
        # float rounding of the two convolution orders, scaled up by the pixel BatchNorm's 1/std: ~2e-5 at most
        torch.testing.assert_close(a.tokens, b.tokens, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(a.pooled, b.pooled, atol=5e-5, rtol=1e-4)
    fast.train(), plain.train()
    grads = [assert_all_grads(m, m.encode(batch).pooled.square().sum(), PRETRAIN_HEADS) for m in (fast, plain)]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    fast.load_state_dict(plain.state_dict())  # contiguous weights copied in keep the channels-last order
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_training_samples_pixels_from_the_step_generator_not_the_device_rng():
    """The step's generator decides the pixels (so a GPU keeps the CPU's, and DDP ranks their rows of one draw);
    the global RNG, which on a GPU would be CUDA's, is left untouched."""
    index = torch.arange(16.0)[None, :, None].expand(3, 16, 2)

    def drawn(seed: int) -> torch.Tensor:
        shard = BatchShard.of(3, training=True, generator=torch.Generator().manual_seed(seed))
        return sample_pixels(index, 6, shard)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(drawn(1), drawn(1)) and not torch.equal(drawn(1), drawn(2))
    assert torch.equal(torch.get_rng_state(), before)


def test_retrieval_negatives_come_from_the_step_generator(monkeypatch):
    model = tiny_pixelbert().train()
    model.ctx = dataclasses.replace(model.ctx, sample_generator=torch.Generator())
    seen = []
    fuse = model.fuse

    def recording_fuse(input_ids, attention_mask, pixel_tokens, **options):
        seen.append(input_ids[:, 1].tolist())
        return fuse(input_ids, attention_mask, pixel_tokens, **options)

    monkeypatch.setattr(model, "fuse", recording_fuse)
    batch = make_batch()
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        model.ctx.sample_generator.manual_seed(11)
        model.retrieval_losses(batch, step=0)
    assert seen[0] == seen[1]
    for generator_seed in range(12, 17):  # and they are drawn: other generator seeds, other negatives
        model.ctx.sample_generator.manual_seed(generator_seed)
        model.retrieval_losses(batch, step=0)
    assert any(other != seen[0] for other in seen[2:])
