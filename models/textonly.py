"""Blind baseline: a BERT-style text encoder and the task's shared head, no image.

Why: a benchmark must show how much of a score the question alone explains. Same text stack as the families (our
BERT layer), so the only difference from a vision-language model is the missing image.
"""

from __future__ import annotations

from omegaconf import DictConfig

from vlbench.models.base import Batch, JointEncoding, ModelContext, TextSizes, VisionLanguageModel
from vlbench.models.layers import TextEncoder, init_bert_weights
from vlbench.registry import MODELS


@MODELS.register("textonly")
class TextOnly(VisionLanguageModel):
    visual_input = "none"
    encodes_pooled_only = True  # its last layer can compute [CLS] alone

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        sizes = TextSizes(**cfg.text)
        self.hidden_size = sizes.hidden_size
        self.text_encoder = TextEncoder(ctx.vocab_size, sizes, cfg.text_layers)
        init_bert_weights(self.text_encoder)

    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        tokens = self.text_encoder(batch["input_ids"], batch["attention_mask"], first_token_only=pooled_only)
        return JointEncoding(pooled=tokens[:, 0], tokens=None if pooled_only else tokens, mask=batch["attention_mask"])
