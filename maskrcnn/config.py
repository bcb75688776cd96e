"""Typed configuration: one dataclass field per knob, loaded from YAML and ``key.sub=value`` overrides.

The defaults reproduce torchvision's ``maskrcnn_resnet50_fpn`` (v1); ``configs/maskrcnn_R50_FPN_v2.yaml``
sets the head depths and normalisations of its ``maskrcnn_resnet50_fpn_v2``. A YAML file only lists what it
changes; :func:`load_config` merges it over these defaults, then applies command-line overrides, and
rejects unknown keys and values of the wrong type with the offending key in the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maskrcnn.errors import InputError

# Overlays and figures draw the detections scoring at least this: a display choice, apart from the model's
# own threshold (``model.roi_heads.score_thresh``, which decides what inference returns).
DISPLAY_SCORE_THRESH = 0.5


@dataclass
class ServiceConfig:
    """The HTTP service's batching and the bounds on what one client can take (``tools/serve.py``,
    :func:`maskrcnn.deploy.serve.create_app`); not part of a run's configuration."""

    max_batch_size: int = 4  # images per batch at most
    max_wait_ms: float = 10.0  # how long a batch waits for more images after its first (milliseconds)
    max_queue: int = 32  # requests held at once (uploading, decoding, waiting, running); more get 503
    timeout_s: float = 60.0  # seconds per request, from its first body byte to its answer
    max_bytes: int = 20 * 2**20  # largest upload in bytes
    max_pixels: int = 40_000_000  # largest image in pixels (W x H), read from its header before decoding
    decode_workers: int = 2  # threads that decode uploads, off the event loop


@dataclass
class InputConfig:
    min_size: List[int] = field(default_factory=lambda: [800])  # shortest side after resize; training picks one at random
    max_size: int = 1333  # cap on the longest side after resize (pixels)
    min_size_test: Optional[int] = None  # shortest side after resize at inference; None: the last of min_size
    max_size_test: Optional[int] = None  # cap on the longest side at inference; None: max_size
    pixel_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel mean of 0-1 RGB input
    pixel_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per-channel std of 0-1 RGB input
    size_divisible: int = 32  # batched images are padded to a multiple of this


@dataclass
class BackboneConfig:
    depth: int = 50  # ResNet depth: 18, 34, 50 or 101
    norm: str = "frozen_bn"  # trunk normalisation: "frozen_bn" (statistics and affine fixed), "bn" or "syncbn"
    freeze_at: int = 2  # stages frozen from the stem: 0 none, 1 stem, 2 stem+res2, ... 5 all
    width: int = 64  # stem channels, doubled by each stage: 64 is torchvision's ResNet (what weights fit)
    fpn_channels: int = 256  # channels of every pyramid level
    fpn_norm: str = ""  # normalisation after the FPN convolutions: "" none, "bn" or "gn"
    pretrained: bool = False  # initialise the trunk from torchvision's ImageNet weights (downloads)


@dataclass
class AnchorConfig:
    sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # anchor side (pixels) per level P2..P6
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width of each anchor


@dataclass
class RPNConfig:
    pre_nms_topk_train: int = 2000  # proposals kept per level before NMS, training
    pre_nms_topk_test: int = 1000  # proposals kept per level before NMS, inference
    post_nms_topk_train: int = 2000  # proposals kept per image after NMS, training
    post_nms_topk_test: int = 1000  # proposals kept per image after NMS, inference
    nms_thresh: float = 0.7  # IoU above which a lower-scoring proposal is suppressed
    min_size: float = 1e-3  # proposals with a side below this (pixels) are dropped
    score_thresh: float = 0.0  # proposals with objectness probability below this are dropped
    fg_iou_thresh: float = 0.7  # anchor IoU with a ground-truth box at or above which it is positive
    bg_iou_thresh: float = 0.3  # anchor IoU below which it is negative
    batch_size_per_image: int = 256  # anchors sampled per image for the RPN losses
    positive_fraction: float = 0.5  # at most this fraction of the sampled anchors is positive
    head_convs: int = 1  # 3x3 convolutions of the RPN head: 1 (torchvision v1) or 2 (v2)


@dataclass
class RoIHeadsConfig:
    num_classes: int = 90  # object classes, background excluded (labels run 1..num_classes)
    box_pooler_resolution: int = 7  # RoIAlign output side for the box head
    mask_pooler_resolution: int = 14  # RoIAlign output side for the mask head (the mask is twice this)
    sampling_ratio: int = 2  # bilinear samples per RoIAlign bin side
    canonical_scale: int = 224  # RoI side mapped to canonical_level
    canonical_level: int = 4  # pyramid level of an RoI of canonical_scale
    box_head_convs: int = 0  # 3x3 convolutions of the box head before its fully connected layers: 0 (v1) or 4 (v2)
    box_head_conv_dim: int = 256  # channels of the box head convolutions
    box_head_norm: str = ""  # normalisation after the box head convolutions: "" none, "bn" or "gn"
    box_head_fcs: int = 2  # fully connected layers of the box head: 2 (v1) or 1 (v2)
    box_head_dim: int = 1024  # width of the fully connected layers of the box head
    mask_head_dim: int = 256  # channels of the mask head convolutions
    mask_head_convs: int = 4  # number of 3x3 convolutions in the mask head
    mask_head_norm: str = ""  # normalisation after the mask head convolutions: "" none, "bn" or "gn"
    fg_iou_thresh: float = 0.5  # proposal IoU at or above which it is foreground
    bg_iou_thresh: float = 0.5  # proposal IoU below which it is background
    batch_size_per_image: int = 512  # RoIs sampled per image for the box and mask losses
    positive_fraction: float = 0.25  # at most this fraction of the sampled RoIs is foreground
    mask_rois_per_image: int = 0  # foreground RoIs per image the mask loss uses (random subset); 0 all of them
    mask_outline_weight: float = 0.0  # extra weight of the mask loss on the target's outline cells; 0 plain BCE
    bbox_reg_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])  # (wx, wy, ww, wh)
    score_thresh: float = 0.05  # detections scoring below this are dropped
    nms_thresh: float = 0.5  # per-class NMS IoU threshold
    detections_per_img: int = 100  # detections kept per image
    mask_threshold: float = 0.5  # probability at which a pasted mask pixel is foreground
    mask_refine: bool = False  # refine the 28x28 masks with a point head (PointRend) on the stride-4 features
    point_head_dim: int = 256  # width of the point head's hidden layers (an MLP applied to each point)
    point_head_fcs: int = 3  # hidden layers of the point head
    point_train_points: int = 196  # points per positive RoI in the point head's loss
    point_oversample_ratio: float = 3.0  # random candidates per training point, the least certain kept
    point_importance_ratio: float = 0.75  # fraction of the training points chosen by uncertainty; the rest uniform
    point_subdivision_steps: int = 2  # 2x upsamplings of the masks at inference (28 -> 56 -> 112)
    point_subdivision_points: int = 784  # least certain cells recomputed per detection at each step


@dataclass
class ModelConfig:
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    fast_roi_align: bool = True  # RoIAlign as an embedding_bag gather (same values, much faster backward on CPU)
    paste_memory_mb: int = 256  # memory budget (MiB) of the chunked mask paste at inference
    precision: str = "auto"  # inference precision: "auto" (bf16 where native, else fp32), "fp32" or "bf16" (autocast)
    weights: str = ""  # start training from this checkpoint or torchvision .pth; class rows matched by name


@dataclass
class DataConfig:
    train_ann: str = "data/shapes/annotations/instances_train.json"  # COCO instances file for training
    train_images: str = "data/shapes/train"  # image folder for training
    val_ann: str = "data/shapes/annotations/instances_val.json"  # COCO instances file for evaluation
    val_images: str = "data/shapes/val"  # image folder for evaluation
    filter_empty: bool = True  # drop training images that have no usable annotation
    skip_bad_annotations: bool = False  # skip malformed annotations with a warning count instead of failing
    annotation_cache: bool = True  # pack the annotations into a memory-mapped cache file beside each json
    annotation_cache_dir: str = ""  # folder for the annotation cache files instead of beside each json ("": beside)
    flip_prob: float = 0.5  # probability of a horizontal flip in training
    scale_jitter: List[float] = field(default_factory=list)  # [low, high]: large-scale jitter instead of the shortest-side resize: the longer side becomes a random factor in [low, high] times max(model.input.min_size), then a random crop or padding to that square; []: off
    copy_paste: bool = False  # paste a random subset of the instances of another training image, augmented the same way, onto each training image (covered instances lose those pixels)
    repeat_factor_threshold: float = 0.0  # t: an image holding a category found in a fraction f < t of the training images is drawn max(1, sqrt(t / f)) times per epoch on average (Detectron2's LVIS repeat-factor sampling); 0: off
    num_workers: int = 2  # DataLoader worker processes
    aspect_ratio_grouping: bool = True  # batch images of similar aspect ratio together (less padding)
    aspect_ratio_groups: int = 2  # aspect-ratio bins from 2:1 to 1:2 when grouping; 2: landscape and portrait


@dataclass
class SolverConfig:
    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.02  # base learning rate (for ims_per_batch images per iteration)
    momentum: float = 0.9  # SGD momentum
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    weight_decay: float = 1e-4  # weight decay of weights
    weight_decay_norm: float = 0.0  # weight decay of normalisation parameters
    weight_decay_bias: float = 0.0  # weight decay of biases
    schedule: str = "multistep"  # "multistep" or "cosine"
    steps: List[int] = field(default_factory=lambda: [60000, 80000])  # iterations at which multistep decays
    gamma: float = 0.1  # multistep decay factor
    min_lr_factor: float = 0.0  # cosine schedule ends at lr * this
    warmup_iters: int = 1000  # linear warmup length (iterations)
    warmup_factor: float = 0.001  # lr multiplier at iteration 0 of the warmup
    max_iter: int = 90000  # training length (iterations)
    ims_per_batch: int = 16  # images per iteration, summed over all processes
    clip_grad_norm: float = 0.0  # clip the gradient norm to this; 0 disables
    ema_decay: float = 0.0  # decay of an fp32 moving average of the weights (e.g. 0.999; warmup min(decay, (1 + t) / (10 + t)) at step t) that evaluation scores and checkpoints hold as "model"; 0: off


@dataclass
class TrainConfig:
    output_dir: str = "output/train"  # checkpoints, logs, figures and the resolved config go here
    device: str = "auto"  # "auto" (cuda if present), "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 where native, else fp32), "fp32", "bf16" (autocast) or "fp16" (CUDA)
    channels_last: Optional[bool] = None  # channels-last convolutions; None: where faster (CUDA, AVX-512 CPUs)
    seed: int = 0  # seeds Python, NumPy and torch; data order derives from it
    checkpoint_period: int = 5000  # save a checkpoint every this many iterations (and at the end)
    log_period: int = 20  # append metrics to the JSONL log and refresh the loss curve this often
    eval_period: int = 0  # evaluate on the validation set this often; 0 evaluates only at the end if asked
    eval_at_end: bool = False  # evaluate on the validation set after training
    tensorboard: bool = False  # also write TensorBoard event files
    sync_bn: bool = False  # convert every BatchNorm (trunk, FPN, heads) to SyncBatchNorm under DDP on CUDA


@dataclass
class ShapesConfig:
    """What ``tools/make_shapes.py`` generates (:func:`maskrcnn.data.shapes.generate_shapes`); not part of a run's
    configuration."""

    num_train: int = 2000  # training images
    num_val: int = 200  # validation images
    seed: int = 0  # generation seed: the same options give the same files
    min_size: int = 128  # smallest image side (pixels)
    max_size: int = 256  # largest image side (pixels)
    categories: str = "basic"  # "basic" (square, circle, triangle), "novel" (star, hexagon, cross) or "edges" (sunburst, gear, comb: thin parts, for large images)
    rare_fraction: float = 1.0  # training split: the last category is drawn this often relative to each other one (0.1: long-tailed)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, merged with a YAML file (if given), then with ``key.sub=value`` overrides.

    Returns a :class:`Config` dataclass instance. Raises ``FileNotFoundError`` for a missing file and
    :class:`~maskrcnn.errors.InputError` (a ``ValueError``) for an unknown key (with the full key it most
    likely meant), a value of the wrong type or an unusable value (:func:`check_config`), naming the file or
    the override it came from.
    """
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise InputError(f"bad configuration in {path}: {_describe(exc)}") from None
    return _with_overrides(merged, overrides)


def _with_overrides(merged, overrides: Sequence[str]) -> Config:
    """The :class:`Config` of an OmegaConf config after ``key.sub=value`` overrides, checked."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} is not of the form key.sub=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise InputError(f"bad override {item!r}: {_describe(exc, item.split('=', 1)[0].strip())}") from None
    cfg = OmegaConf.to_object(merged)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """InputError naming the key for a value that has the right type but cannot work."""
    i = cfg.model.input
    if not i.min_size or any(s <= 0 for s in i.min_size):
        raise InputError(f"model.input.min_size must be a non-empty list of positive sizes, got {list(i.min_size)}")
    for key, value in (("model.input.max_size", i.max_size), ("model.input.size_divisible", i.size_divisible),
                       ("model.input.min_size_test", 1 if i.min_size_test is None else i.min_size_test),
                       ("model.input.max_size_test", 1 if i.max_size_test is None else i.max_size_test),
                       ("model.backbone.width", cfg.model.backbone.width),
                       ("model.roi_heads.num_classes", cfg.model.roi_heads.num_classes),
                       ("solver.ims_per_batch", cfg.solver.ims_per_batch),
                       ("data.aspect_ratio_groups", cfg.data.aspect_ratio_groups)):
        if value <= 0:
            raise InputError(f"{key} must be positive, got {value}")
    for key, values in (("model.input.pixel_mean", i.pixel_mean), ("model.input.pixel_std", i.pixel_std)):
        if len(values) != 3:
            raise InputError(f"{key} needs one value per RGB channel (3), got {list(values)}")
    if any(s <= 0 for s in i.pixel_std):
        raise InputError(f"model.input.pixel_std must be positive, got {list(i.pixel_std)}")
    b = cfg.model.backbone
    if b.pretrained and b.width != 64:
        raise InputError(f"model.backbone.pretrained loads ImageNet weights of width 64; model.backbone.width is "
                         f"{b.width}")


def _all_keys(node=None, prefix: str = "") -> List[str]:
    """Every leaf key of the configuration, dotted (``model.backbone.depth``, ...)."""
    import dataclasses

    node = Config() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _describe(exc: OmegaConfBaseException, written: str = "") -> str:
    """OmegaConf's error as one line naming the full key; for an unknown key, the keys it may have meant.

    written: the whole dotted key as the user wrote it (OmegaConf names only its first unknown part).
    """
    full_key = getattr(exc, "full_key", None) or ""
    message = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    if "not in" in message and full_key:
        import difflib

        if written.startswith(full_key):
            full_key = written
        keys = _all_keys()
        leaf = full_key.split(".")[-1]
        meant = [k for k in keys if k.endswith("." + full_key) or k == full_key]
        meant += [k for k in difflib.get_close_matches(full_key, keys, n=3, cutoff=0.6) if k not in meant]
        if not meant:
            meant = [k for k in keys if k.split(".")[-1] == leaf][:3]
        hint = f"; did you mean {' or '.join(meant)}?" if meant else ""
        return f"unknown key {full_key!r}{hint}"
    return f"{message} (key {full_key})" if full_key else message


def config_to_yaml(cfg: Config) -> str:
    """The full resolved configuration as YAML text (every field, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Rebuild a :class:`Config` from a plain dict (as stored in checkpoints), validating types, then apply
    ``key.sub=value`` overrides as :func:`load_config` does (and check the values, when there are any)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), data)
    return _with_overrides(merged, overrides) if overrides else OmegaConf.to_object(merged)


def config_to_dict(cfg: Config) -> dict:
    """A plain dict of every field, for storing in a checkpoint."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_reference_markdown() -> str:
    """A Markdown table of every configuration field: key, default and the comment beside it in this file.

    docs/configuration.md's reference is this text, so the two cannot drift apart (a test checks it).
    """
    import dataclasses
    import inspect
    import tokenize
    from io import StringIO

    comments = {}
    for cls in (InputConfig, BackboneConfig, AnchorConfig, RPNConfig, RoIHeadsConfig, ModelConfig, DataConfig,
                SolverConfig, TrainConfig):
        source = inspect.getsource(cls)
        for tok in tokenize.generate_tokens(StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                line = source.splitlines()[tok.start[0] - 1].strip()
                comments[(cls.__name__, line.split(":")[0].strip())] = tok.string.lstrip("# ").strip()

    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                shown = str(value).replace("'", "") if not isinstance(value, str) else f'"{value}"'
                meaning = comments.get((type(obj).__name__, f.name), "")
                rows.append(f"| `{key}` | `{shown}` | {meaning} |")

    walk(Config(), "")
    return "\n".join(rows) + "\n"


def readme_with_config_reference(readme: str) -> str:
    """``readme`` with the text between its ``config-reference`` markers replaced by the generated table."""
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    if start not in readme or end not in readme:
        raise InputError(f"the page has no {start} ... {end} section")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    body = ("\n## Configuration reference\n\nEvery field of `maskrcnn/config.py`, with its default. A YAML file in "
            "`configs/` lists only what it changes; `key.sub=value` arguments override both.\n\n"
            + config_reference_markdown())
    return f"{head}{start}{body}{end}{tail}"
