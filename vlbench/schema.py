"""Structured-config schemas: every yaml node under conf/ is validated against one of these at composition time.

Why: a misspelled key or a wrong type must fail when the run starts, never deep inside training. Each config group's
yaml names its schema in its defaults list (``- /schema/model/albef``), so Hydra rejects such keys while composing
(``vlbench.cli`` turns its message into one line). A key added with ``+`` gets past Hydra, which opens the schema for
it; ``check_known_keys`` (run by the ``RejectUnknownKeys`` callback, before any run directory exists) rejects those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf

from vlbench.errors import VlbenchError, exit_with_error
from vlbench.models.base import TextSizes  # the sizes every BERT-style text stack shares


@dataclass
class ScaleConfig:
    name: str = MISSING  # tiny | base
    image_size: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    max_steps: int = MISSING


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    epochs: float = 0.0  # > 0: train this many passes over the training split (sets max_steps; the papers' unit)
    batch_size: int = 32  # the global batch: under torchrun each of N processes loads batch_size / N
    eval_batch_size: int = 128
    grad_accum_steps: int = 1
    lr: float = 1e-4
    # the lr of a run that starts from trained weights (init_from): tiny scales pre-train from scratch at a high lr
    # that would wipe out what pre-training learnt; null: lr. The run's config.yaml records the lr it used.
    finetune_lr: float | None = None
    head_lr_multiplier: float = 1.0
    weight_decay: float = 0.02
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.05  # used when warmup_steps == 0
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    clip_grad_norm: float = 1.0
    # AdamW's kernel: auto = fused (one kernel over all tensors; 4x faster than the per-tensor loop on CPU at tiny
    # scale) except under FSDP (sharded tensors: foreach) | fused | foreach | loop. Same update up to rounding.
    optimizer_impl: str = "auto"
    # CPU: glibc keeps freed blocks (up to 1 GiB) for the next step instead of returning them to the kernel, which
    # re-faults them at every step (vlbench/host_memory.py: Pixel-BERT tiny VQA 197 -> 174 s). Speed only, bitwise the
    # same numbers; once applied, a process keeps it.
    keep_freed_memory: bool = True
    # where a head or objective reads only the pooled [CLS] (the shared heads, ITM), the last fused layer computes
    # [CLS] alone instead of every token nothing reads (models/base.py ``pooled_only_for``); where a pre-training loss
    # reads some positions (MLM's masked words, LXMERT's labelled regions), it computes those alone. The same function
    # up to float rounding (tiny VQA runs: UNIMO-3 198 -> 161 s, LXMERT 96 -> 83 s); with dropout (base scale) the
    # draws differ, from the same distribution. false: every token state, as before
    skip_unread_states: bool = True
    max_bad_steps: int = 5  # steps in a row with a non-finite loss or gradient norm (each skipped) before the run stops
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile for training (default mode); evaluation and checkpoints stay eager
    # what compile compiles: blocks (each transformer block, one compiled function per kind of block; the masking and
    # loss code around them stays eager) | forward (the whole training forward: graph breaks and recompilations at
    # its data-dependent steps)
    compile_scope: str = "blocks"
    device: str = "auto"  # auto | cpu | cuda
    # memory for base scale on small GPUs (docs/RELIABILITY.md); neither changes the numbers
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    eval_every: int = 0  # 0: at the end only
    log_every: int = 20
    checkpoint_every: int = 0  # 0: only at evaluations and at the end
    stop_at_step: int = 0  # >0: save a resumable checkpoint and stop there (time-sliced jobs; resume=<run dir>)
    num_workers: int = 0
    eval_split: str = "val"
    test_split: str = "test"
    test_checkpoint: str = "best"  # best (by val main metric) | last
    # also score what a model that learned nothing scores on the test split (VQA/GQA/NLVR2: the answer prior;
    # retrieval: chance), record it and warn when the run does not clear it (vlbench/floor.py); results-neutral
    floor: bool = True
    progress: bool = True


@dataclass
class DatasetFiles:
    """Where one dataset format's files lie under ``data.root``; tasks read the format they need."""

    # image path relative to the format's folder; fields: {subtype} (the split's own name), {image_id}, and the
    # format's own ({filepath}/{filename} for Karpathy, {identifier}/{index} for NLVR2)
    image_template: str = MISSING
    splits: dict[str, str] = field(default_factory=dict)  # train / val / test → the dataset's own split names
    subdir: str = ""  # the format's folder under data.root ("": root itself)
    region_features: str | None = None  # region-feature store for region models (relative to the format's folder)
    max_regions: int = 36  # regions per image fed to region models (the BUTD/LXMERT standard is 36)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str | None = None  # a directory in the official format; null for the synthetic world (generated)
    cache_dir: str | None = None  # where the synthetic world is generated; null: $VLBENCH_CACHE or ~/.cache/vlbench
    image_size: int = 64
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    augmentation: str = "none"  # recorded in every run; horizontal flips would break left/right questions
    cache_images: bool = False
    # region features the synthetic world extracts on first use for region models (over ground-truth boxes)
    region_backbone: str = "pixels"  # pixels (RoIAlign grid of RGB values, flattened) or a timm model name
    region_roi_size: int = 7  # with pixels: 3 × 7 × 7 = 147-d features
    tokenizer: str = "auto"  # auto: <root>/tokenizer.json; otherwise a local path or hub name (local files only)
    max_text_len: int = 32
    # the dataset formats found under root, keyed by format (vqav2 | gqa | nlvr2 | karpathy); a task reads its own
    datasets: dict[str, DatasetFiles] = field(default_factory=dict)
    limit_examples: int = 0  # >0: use only the first N examples of each split (smoke runs)
    # synthetic world parameters (ignored for real data)
    seed: int = 0
    images: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 300, "test": 600})
    questions_per_image: int = 5
    grid_size: int = 4
    min_objects: int = 2
    max_objects: int = 5
    noisy_annotator_rate: float = 0.12
    # per-format sizes (each format's folder is generated only when a task reads it)
    gqa_images: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 300, "test": 600})
    gqa_questions_per_image: int = 5  # a primary question and the questions it entails, on the same image
    nlvr2_sentences: dict[str, int] = field(default_factory=lambda: {"train": 2500, "val": 200, "test": 300})
    nlvr2_pairs_per_sentence: int = 4  # image pairs per sentence (NLVR2's consistency groups)
    karpathy_images: dict[str, int] = field(
        default_factory=lambda: {"train": 2000, "restval": 100, "val": 200, "test": 200}
    )
    captions_per_image: int = 5


@dataclass
class TaskConfig:
    name: str = MISSING
    main_metric: str = MISSING


@dataclass
class VQATaskConfig(TaskConfig):
    name: str = "vqa"
    main_metric: str = "accuracy"
    num_answers: int = 3129  # top-K training answers; 3,129 is the bottom-up-attention standard on real data
    head_hidden_multiplier: int = 2  # the shared 2-layer MLP's hidden width = multiplier × model hidden size
    head_dropout: float = 0.1


@dataclass
class GQATaskConfig(TaskConfig):
    name: str = "gqa"
    main_metric: str = "accuracy"
    num_answers: int = 1842  # top-K training answers (LXMERT's GQA vocabulary has 1,842)
    head_hidden_multiplier: int = 2
    head_dropout: float = 0.1


@dataclass
class NLVR2TaskConfig(TaskConfig):
    name: str = "nlvr2"
    main_metric: str = "accuracy"
    head_dropout: float = 0.1


@dataclass
class RetrievalTaskConfig(TaskConfig):
    name: str = "retrieval"
    main_metric: str = "mean_recall"
    scoring: str = "auto"  # auto | itc | itm | itc_itm (auto: itc_itm for head=native with ITC, else itm)
    rerank_k: int = 16  # itc_itm: ITM rescoring of each query's k best candidates by ITC (ALBEF uses 128 / 256)
    include_restval: bool = True  # Karpathy's restval images join training (the COCO standard)
    head_dropout: float = 0.1


@dataclass
class TextAssignmentTaskConfig(TaskConfig):
    name: str = "nlvr2_ta"
    main_metric: str = "accuracy"  # 3-way: the text matches the first image, the second, or neither
    include_restval: bool = True


@dataclass
class PretrainTaskConfig(TaskConfig):
    name: str = "pretrain"
    main_metric: str = "loss"  # validation loss of the summed objectives (lower is better)
    include_restval: bool = True
    loss_weights: dict[str, float] = field(default_factory=dict)  # per-objective weight; missing objectives 1.0
    zero_shot_retrieval: bool = True  # evaluate ITC retrieval on the val split when the model has embeddings
    qa: str = "auto"  # add image-QA pairs (LXMERT): auto (when the model has a QA objective) | on | off
    # LXMERT-format QA files per split, in the Karpathy folder (real data: mscoco_train.json, vgnococo.json, ...)
    qa_files: dict[str, list[str]] = field(
        default_factory=lambda: {"train": ["lxmert_train.json"], "val": ["lxmert_val.json"]}
    )
    num_qa_answers: int = 9500  # the answer table: top-K training answers (LXMERT: 9,500)


@dataclass
class ModelConfig:
    name: str = MISSING
    default_head: str = "shared"


@dataclass
class VitTextModelConfig(ModelConfig):
    """The sizes of a ViT image encoder (timm VisionTransformer) and of BERT-style text stacks (ALBEF, UNIMO-3)."""

    vit_patch_size: int = 16
    vit_hidden_size: int = 768
    vit_depth: int = 12
    vit_num_heads: int = 12
    vit_mlp_ratio: float = 4.0
    text: TextSizes = field(default_factory=TextSizes)


@dataclass
class AlbefModelConfig(VitTextModelConfig):
    name: str = "albef"
    # BERT text (first N layers) + fusion (last M layers with cross-attention)
    text_layers: int = 6
    fusion_layers: int = 6
    # contrastive + momentum
    embed_dim: int = 256
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    queue_size: int = 65536
    momentum: float = 0.995
    distill: bool = True
    alpha: float = 0.4
    alpha_warmup_steps: int = 0  # alpha ramps linearly from 0 over these steps
    alpha_warmup_epochs: float = 0.0  # ... or over these epochs of the training split (the paper: 1); wins when > 0
    mlm_probability: float = 0.15
    answer_rank_k: int = 128  # native VQA: candidates rescored by full likelihood (top-k by first-token probability)
    nlvr_merge: str = "replicate"  # native NLVR2: ALBEF's block pairs | linear | mean (BLIP's merged cross-attention)
    # initial weights from local files (never downloaded): timm ViT (e.g. DeiT-B/16), BERT, the official ALBEF release
    vit_init: str | None = None
    bert_init: str | None = None
    init_checkpoint: str | None = None


@dataclass
class LxmertModelConfig(ModelConfig):
    name: str = "lxmert"
    text: TextSizes = field(default_factory=TextSizes)  # shared by the language, object and cross encoders
    l_layers: int = 9  # language encoder
    r_layers: int = 5  # object-relationship encoder
    x_layers: int = 5  # cross-modality encoder
    visual_feature_dim: int = 2048  # RoI feature size (BUTD Faster R-CNN); checked against the region store
    visual_pos_dim: int = 4  # normalised box x1, y1, x2, y2
    num_object_labels: int = 1600  # detector object classes (Visual Genome); set to the data's label vocabulary
    num_attr_labels: int = 400
    num_qa_labels: int = 9500  # pre-training answer table; 0: no QA head or objective
    mlm_probability: float = 0.15
    object_mask_probability: float = 0.15
    matching_probability: float = 0.5  # a pair's sentence is replaced by another pair's with this probability
    visual_loss_normalizer: float = 6.67  # multiplies each masked-object loss (≈ 1 / object_mask_probability)
    label_all_regions: bool = True  # obj/attr labels on every region (reference code) | only masked ones (paper)
    qa_start_step: int = 0  # QA objective from this step on (the paper: the second half of pre-training)
    qa_start_epochs: float = 0.0  # ... or from this many passes over the training split (paper: 10 of 20); wins if > 0
    init_checkpoint: str | None = None  # a local reference checkpoint (original release or transformers) to load


@dataclass
class PixelBertModelConfig(ModelConfig):
    name: str = "pixelbert"
    # CNN backbone (timm, trained end to end): its feature map at ``cnn_out_index`` gives the pixel tokens
    cnn: str = "resnet50"
    cnn_kwargs: dict[str, Any] = field(default_factory=dict)  # timm create_model overrides (e.g. layers, channels)
    cnn_out_index: int = 4  # timm features_only index: 4 = last ResNet stage (stride 32), 3 = stride 16
    cnn_init: str | None = None  # local timm state dict for the CNN (never downloaded)
    channels_last: bool = True  # CNN weights and input in NHWC memory order: faster convolutions, same numbers
    pixel_position: str = "none"  # none (the paper describes no pixel position signal) | learned_2d (row + column)
    pixel_norm: str = "batchnorm"  # batchnorm (per channel, then + s_v) | layernorm (BERT's: LN(Linear(f) + s_v))
    pixel_sample: int | None = 100  # pixels kept per image and step in pre-training (paper: 100); null: all
    pixel_sample_in_finetune: bool = False  # the paper samples in pre-training only
    # single-stream transformer over [text ; pixels]
    text: TextSizes = field(default_factory=TextSizes)
    num_layers: int = 12
    init_std: float = 0.02  # normal init std of the transformer's weights (BERT's initializer_range: 768 wide)
    # pre-training
    mlm_probability: float = 0.15
    matching_probability: float = 0.5  # a caption is paired with another caption's image with this probability
    mlm_matched_only: bool = True  # MLM loss on matched pairs only
    retrieval_negatives: int = 20  # native retrieval: negative captions ranked against each positive


@dataclass
class Unimo3ModelConfig(VitTextModelConfig):
    name: str = "unimo3"
    # every ViT block's and text layer's output is a level the cross-modal layers may read; `text` also sizes them
    text_layers: int = 12
    cross_layers: int = 6  # two-stream cross-modal layers
    # multi-granularity interaction
    cross_layer: bool = True  # false: in-layer interaction only (the ablation)
    cross_layer_source: str = "unimodal"  # unimodal (every unimodal layer) | cross_modal (earlier cross-modal layers)
    unimodal_levels: int = 0  # with source unimodal: the top N layers of each unimodal encoder (0: all)
    gate: str = "adaptive"  # adaptive (softmax over levels from the query states) | average (uniform weights)
    retrieval_cache: bool = True  # retrieval caches every unimodal level read (false: re-encode each pair)
    # objectives
    embed_dim: int = 256
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    mlm_probability: float = 0.15


@dataclass
class TextOnlyModelConfig(ModelConfig):
    name: str = "textonly"
    text: TextSizes = field(default_factory=TextSizes)
    text_layers: int = 12


@dataclass
class MajorityModelConfig(ModelConfig):
    name: str = "majority"
    default_head: str = "native"


@dataclass
class LoggerConfig:
    name: str = "none"  # none | jsonl | wandb
    wandb_project: str = "vlbench"
    wandb_mode: str = "offline"  # offline | disabled | online (online only when the user asks)


@dataclass
class Config:
    model: Any = MISSING
    task: Any = MISSING
    data: DataConfig = MISSING
    scale: ScaleConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    head: str = "shared"  # shared (controlled comparison) | native (the paper's own head)
    results_dir: str = "results/runs"
    run_id: str | None = None  # null: <scale>-seed<seed>-<date>-<time> (conf/config.yaml's hydra.run.dir)
    resume: str | None = None  # a run directory to continue; auto: this run's directory if it has a checkpoint
    init_from: str | None = None  # a finished run directory or .safetensors file: its model weights start this run
    reuse_finished: bool = False  # skip the run when one with the same config already finished under reuse_root
    reuse_root: str = "results"  # searched by reuse_finished and by init_from=pretrained
    deterministic: bool = False


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {
        "albef": AlbefModelConfig,
        "lxmert": LxmertModelConfig,
        "pixelbert": PixelBertModelConfig,
        "unimo3": Unimo3ModelConfig,
        "textonly": TextOnlyModelConfig,
        "majority": MajorityModelConfig,
    },
    "task": {
        "vqa": VQATaskConfig,
        "gqa": GQATaskConfig,
        "nlvr2": NLVR2TaskConfig,
        "retrieval": RetrievalTaskConfig,
        "pretrain": PretrainTaskConfig,
        "nlvr2_ta": TextAssignmentTaskConfig,
    },
    "data": {"data": DataConfig},
    "scale": {"scale": ScaleConfig},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
}


def register_schemas() -> None:
    """Register every schema under ``schema/<group>/<name>`` so yaml files can extend them."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


# Hydra's own node: Hydra validates it. Every other node whose type is one of the dataclasses above is closed; a dict
# field (``data.datasets``, ``model.cnn_kwargs``, ``task.loss_weights``) takes any key.
FREE_FORM_TOP_LEVEL_KEYS = frozenset({"hydra"})


def unknown_key_message(full_key: str, known: list[str]) -> str:
    """The one line for a key no schema declares, listing the keys that node has (to spot the typo)."""
    parent = full_key.rpartition(".")[0]
    where = f"of {parent}" if parent else "at the top level"
    return f"unknown config key '{full_key}' (known keys {where}: {', '.join(sorted(known))})"


def _schema_nodes(node: DictConfig, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every dict node under ``node`` (itself included) with its dotted path; interpolations and missing values are
    skipped (they hold no keys of their own)."""
    yield path, node
    for key in node:
        if not path and key in FREE_FORM_TOP_LEVEL_KEYS:
            continue
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):
            yield from _schema_nodes(child, f"{path}.{key}" if path else str(key))


def check_known_keys(cfg: DictConfig) -> None:
    """Raise a VlbenchError for the first key that the schema of its node does not declare.

    Why: Hydra lets ``+trainer.max_stepz=5`` add a key to a schema node (``+`` opens the struct), and the run would then
    silently ignore it; a typo must fail at start like ``trainer.max_stepz=5`` does."""
    for path, node in _schema_nodes(cfg, ""):
        schema = OmegaConf.get_type(node)
        if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
            continue  # a dict node: free keys
        known = [f.name for f in dataclasses.fields(schema)]
        allowed = set(known) | (FREE_FORM_TOP_LEVEL_KEYS if not path else set())
        for key in node:
            if key not in allowed:
                raise VlbenchError(unknown_key_message(f"{path}.{key}" if path else str(key), known))


class RejectUnknownKeys(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): ``check_known_keys`` on the composed config before
    Hydra creates the run directory; for a sweep on the common config before any job starts, and on each job's
    config as it starts (a key added by a swept ``+key=a,b`` exists only there).

    Hydra turns an exception raised in a callback into a warning, so an unknown key ends the process here, as the
    command ends on any VlbenchError: one line on stderr, exit status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_known_keys(config)
        except VlbenchError as error:
            exit_with_error(error)
