"""Typed configuration of the D2F trainer (paper Sec. 3 "asymmetric distillation").

The dataclasses below are the source of truth; Hydra YAML under `d2f/configs/` only selects and
overrides them. `register_configs()` stores the schema in Hydra's ConfigStore, so a misspelt key
fails at composition time, and `__post_init__` checks every value when the composed config is turned
into objects (`OmegaConf.to_object`), before any data or weights are read. Error messages name the
full dotted key (e.g. `train.lr`).

Layout (one Hydra group per top-level section):

    model   what to train from: checkpoint path, dtype, attention backend, init
    data    question/answer sources, field names, sequence length, chat template
    train   objective, optimiser, schedule, batch, checkpoints, logging; with nested
            train.noise (the block noise schedule), train.lora (the student adapter) and
            train.certainty (the dparallel / d3llm objectives)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import MISSING

from d2f.paths import is_local

SCHEDULES = ("ramp", "random", "single")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa")  # both take our explicit 4D additive masks


def check_attention(name: str | None, where: str = "attn_implementation") -> None:
    """Refuse an attention backend that cannot take d2f's explicit 4D float masks, before any load.

    NOTE: `flex_attention` is refused: transformers converts a 4D tensor mask for flex itself and on
    CPU the process then aborts ("double free or corruption"); d2f's decoder and trainer pass 4D
    masks. (`d2f.mask.flex_block_mask` is the rule as a `BlockMask`, tested inside the model, but
    no d2f loop passes it yet.) Flash-attention kernels take no arbitrary mask at all.
    """
    if name is None or name in ATTENTION:
        return
    why = {
        "flex_attention": "d2f passes 4D float masks, which transformers converts for flex; on "
        "CPU that aborts the process (a double free)",
    }.get(name, "d2f passes explicit 4D float masks, which only these backends take")
    raise ValueError(f"{where}={name!r} is not supported: {why}; use one of {ATTENTION}")


def _families() -> tuple[str, ...]:
    from d2f.family import SPECS  # transformers: imported only when a config is checked

    return tuple(SPECS)


def _objectives() -> tuple[str, ...]:
    from d2f.objectives import OBJECTIVES  # torch: imported only when a config is checked

    return tuple(OBJECTIVES)


def __getattr__(name: str) -> tuple[str, ...]:
    """`FAMILIES` / `OBJECTIVES`: the names of the registries `d2f.family.SPECS` and
    `d2f.objectives.OBJECTIVES`, derived from them when asked for (this module stays light)."""
    if name == "FAMILIES":
        return _families()
    if name == "OBJECTIVES":
        return _objectives()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} {rule} (got {value!r})")


def _choice(value, choices: tuple, key: str) -> None:
    _check(value in choices, key, f"must be one of {choices}", value)


@dataclass
class ModelConfig:
    """The model to train. `family` is optional: when set, the checkpoint must be of that family."""

    path: str = MISSING  # hub id or local directory in the family's original format
    family: str | None = None  # expected family: llada | dream | ar; None = detect from config.json
    init: str = "pretrained"  # pretrained: load the weights | scratch: random init from config.json
    init_seed: int = 0  # seed of the random init when init=scratch
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 (frozen 8B bases) | float16
    attn_implementation: str = "sdpa"  # eager | sdpa (eager is faster for tiny CPU models)
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory)

    def __post_init__(self) -> None:
        # NOTE: OmegaConf builds the schema with MISSING defaults; required fields are enforced by
        # OmegaConf itself (MissingMandatoryValue), so a MISSING value skips the checks here.
        _check(self.path != "", "model.path", "must be set", self.path)
        if self.path != MISSING and is_local(self.path):
            _check(
                Path(self.path).expanduser().is_dir(),
                "model.path",
                "is not an existing directory (nor a hub id 'org/name')",
                self.path,
            )
        _choice(self.family, (None, *_families()), "model.family")
        _choice(self.init, ("pretrained", "scratch"), "model.init")
        _choice(self.dtype, DTYPES, "model.dtype")
        _choice(self.attn_implementation, ATTENTION, "model.attn_implementation")


@dataclass
class DataConfig:
    """Question/answer records: prompt = templated question, answer = answer + end + padding."""

    sources: list[str] = MISSING  # hub ids, local dataset dirs, .jsonl/.json/.parquet/.csv files
    split: str = "train"  # split of hub ids and dataset dirs (local files are one split)
    question_field: str = "question"  # record field holding the prompt text
    answer_field: str = "qwen7b_answer"  # record field holding the answer text
    max_length: int = 1024  # tokens per sequence (prompt + answer + end + padding); longer: skipped
    chat_template: bool | None = None  # question through the chat template; None = family's
    max_records: int | None = None  # keep only the first N records (quick runs); None = all
    cache_dir: str | None = None  # datasets cache directory; None = the datasets default

    def __post_init__(self) -> None:
        sources = [] if self.sources == MISSING else self.sources
        _check(
            self.sources == MISSING or len(sources) > 0,
            "data.sources",
            "must list a source",
            sources,
        )
        for i, src in enumerate(sources):
            if is_local(src):
                _check(
                    Path(src).expanduser().exists(),
                    f"data.sources[{i}]",
                    "does not exist (local file or directory)",
                    src,
                )
        _check(self.max_length > 1, "data.max_length", "must be > 1", self.max_length)
        _check(bool(self.question_field), "data.question_field", "must be set", self.question_field)
        _check(bool(self.answer_field), "data.answer_field", "must be set", self.answer_field)
        _check(
            self.max_records is None or self.max_records > 0,
            "data.max_records",
            "must be > 0 or null",
            self.max_records,
        )


@dataclass
class NoiseConfig:
    """Per-block mask ratios (d2f.schedule): ramp (D2F), random (ablation), single (plain MDM)."""

    schedule: str | None = None  # ramp | random | single; None: distill ramp, mdm single
    block_size: int = 16  # answer tokens per block (student attention and noise), >= 1
    lo: float = 0.2  # lower ratio bound of ramp / random, in [0, 1]
    hi: float = 0.7  # upper ratio bound of ramp / random, in [lo, 1]
    eps: float = 1e-3  # single: t ~ U(eps, 1], in [0, 1)
    mask_padding: bool = True  # end padding is maskable and in the loss (released recipe)

    def __post_init__(self) -> None:
        _choice(self.schedule, (None, *SCHEDULES), "train.noise.schedule")
        _check(self.block_size > 0, "train.noise.block_size", "must be > 0", self.block_size)
        _check(0.0 <= self.lo <= 1.0, "train.noise.lo", "must lie in [0, 1]", self.lo)
        _check(0.0 <= self.hi <= 1.0, "train.noise.hi", "must lie in [0, 1]", self.hi)
        _check(
            self.lo <= self.hi, "train.noise.lo", f"must be <= train.noise.hi={self.hi}", self.lo
        )
        _check(0.0 <= self.eps < 1.0, "train.noise.eps", "must lie in [0, 1)", self.eps)


@dataclass
class LoraConfig:
    """The student's LoRA adapter (distill only): r 32, alpha 32, dropout 0.1 in the paper."""

    r: int = 32  # rank, >= 1
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.1  # dropout on the adapter input, in [0, 1)
    target_modules: list[str] | None = None  # transformers module names; None = family attention

    def __post_init__(self) -> None:
        _check(self.r > 0, "train.lora.r", "must be > 0", self.r)
        _check(self.alpha > 0, "train.lora.alpha", "must be > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "train.lora.dropout", "must lie in [0, 1)", self.dropout)


TRAJECTORY_MODES = ("intended", "upstream")


@dataclass
class CertaintyConfig:
    """dParallel / d3LLM objectives (`dparallel`, `d3llm`; d2f.certainty, docs/training.md)."""

    mask_prob: float = 0.5005  # dparallel: P(masked) in the active block, (0, 1]; 0.5(1-eps)+eps
    temperature: float = 0.5  # entropy term H(softmax(z / temperature)) of correct tokens, > 0
    entropy_weight: float | None = None  # lambda, >= 0; None = the authors' (2 LLaDA, 1 Dream)
    ratio_min: float = 0.0  # d3llm: r ~ U[ratio_min + (ratio_max - ratio_min) * progress, max]
    ratio_max: float = 0.8  # d3llm: upper bound of the mask ratio r, in [ratio_min, 1]
    block_sizes: list[int] | None = None  # d3llm: block size per epoch; None = noise.block_size
    trajectory: str = "intended"  # d3llm: intended | upstream (off-by-one, teacher blocks)

    def __post_init__(self) -> None:
        key = "train.certainty."
        _check(0.0 < self.mask_prob <= 1.0, key + "mask_prob", "must lie in (0, 1]", self.mask_prob)
        _check(self.temperature > 0, key + "temperature", "must be > 0", self.temperature)
        _check(
            self.entropy_weight is None or self.entropy_weight >= 0,
            key + "entropy_weight",
            "must be >= 0 or null",
            self.entropy_weight,
        )
        _check(
            0.0 <= self.ratio_min <= self.ratio_max <= 1.0,
            key + "ratio_min",
            f"and ratio_max={self.ratio_max} must satisfy 0 <= min <= max <= 1",
            self.ratio_min,
        )
        _check(
            self.block_sizes is None or (len(self.block_sizes) > 0 and min(self.block_sizes) > 0),
            key + "block_sizes",
            "must be null or a non-empty list of sizes > 0",
            self.block_sizes,
        )
        _choice(self.trajectory, TRAJECTORY_MODES, key + "trajectory")


@dataclass
class TrainConfig:
    """Objective, optimiser, batch, checkpoints and logs of one run."""

    objective: str = (
        "distill"  # distill (D2F student) | mdm | ar | dparallel | d3llm | fast_dllm_v2
    )
    max_steps: int = 50_000  # optimiser steps in total (a resumed run stops here too)
    micro_batch_size: int = 1  # sequences per process per forward
    grad_accum: int = 1  # micro-batches per optimiser step; global batch = micro * accum * procs
    lr: float = 1e-5  # peak learning rate, > 0 (LLaDA 1e-5, Dream 5e-6)
    lr_schedule: str = "constant"  # constant | cosine (decays to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps, >= 0
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr, in [0, 1]
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.05  # AdamW decoupled weight decay, on every trained tensor
    clip_grad_norm: float = 1.0  # max global grad norm; <= 0 disables clipping (norm still logged)
    on_nonfinite: str = "stop"  # NaN/inf loss or grad norm: stop (error naming the step) | skip
    mixed_precision: str = "no"  # no | bf16 (autocast forward; softmax and losses stay fp32)
    seed: int = 0  # seeds data order, noise, adapter init and dropout
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    output_dir: str = "runs/d2f"  # checkpoints, metrics.jsonl, config.yaml
    save_every: int = 1000  # optimiser steps between checkpoints (one is always written at the end)
    keep_last: int = 0  # keep only the newest N checkpoints; 0 = keep all
    resume: str = "auto"  # auto (newest in output_dir, if any) | never | a checkpoint dir
    log_every: int = 1  # optimiser steps between metric records
    wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "d2f"  # wandb project name
    wandb_mode: str = "offline"  # offline (sync later, never needs network) | online
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    certainty: CertaintyConfig = field(default_factory=CertaintyConfig)

    def __post_init__(self) -> None:
        _choice(self.objective, _objectives(), "train.objective")
        _choice(self.on_nonfinite, ("stop", "skip"), "train.on_nonfinite")
        for key in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "log_every"):
            _check(getattr(self, key) > 0, f"train.{key}", "must be > 0", getattr(self, key))
        _check(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _choice(self.lr_schedule, ("constant", "cosine"), "train.lr_schedule")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        _check(
            0 <= self.min_lr_ratio <= 1,
            "train.min_lr_ratio",
            "must lie in [0, 1]",
            self.min_lr_ratio,
        )
        _check(0.0 <= self.beta1 < 1.0, "train.beta1", "must lie in [0, 1)", self.beta1)
        _check(0.0 <= self.beta2 < 1.0, "train.beta2", "must lie in [0, 1)", self.beta2)
        _check(self.adam_eps > 0, "train.adam_eps", "must be > 0", self.adam_eps)
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _choice(self.mixed_precision, ("no", "bf16"), "train.mixed_precision")
        _check(self.threads >= 0, "train.threads", "must be >= 0", self.threads)
        _check(self.keep_last >= 0, "train.keep_last", "must be >= 0", self.keep_last)
        _check(bool(self.output_dir), "train.output_dir", "must be set", self.output_dir)
        _choice(self.wandb_mode, ("offline", "online"), "train.wandb_mode")
        if self.resume not in ("auto", "never"):
            _check(
                Path(self.resume).is_dir(),
                "train.resume",
                "must be auto, never or a checkpoint directory",
                self.resume,
            )


@dataclass
class RunConfig:
    """A whole training run: `python -m d2f.train --config-name <preset> [key=value ...]`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dry_run: bool = False  # print the resolved config and exit without reading data or weights

    def __post_init__(self) -> None:
        if self.model.init == "scratch":
            _check(
                self.train.objective != "distill",
                "model.init",
                "scratch needs train.objective mdm or ar (distillation needs a trained teacher)",
                self.model.init,
            )


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore as `d2f_train_schema` (presets extend it)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if "d2f_train_schema.yaml" not in store.repo:  # idempotent: tests compose many times
        store.store(name="d2f_train_schema", node=RunConfig)


def config_dir() -> Path:
    """The package's `d2f/configs/` directory (presets and groups; package data, so it works installed)."""
    return Path(__file__).resolve().parent / "configs"


def load_config(preset: str = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """Compose `d2f/configs/<preset>.yaml` with dotted overrides and validate it (no Hydra run dir)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir())):
        cfg = compose(config_name=preset, overrides=list(overrides or []))
    return to_run_config(cfg)


def to_run_config(cfg) -> RunConfig:
    """A composed Hydra config -> validated `RunConfig`. Keys the schema does not know (e.g. from
    `+train.foo=1`, which Hydra adds even to a typed node) are refused, naming them."""
    from omegaconf import OmegaConf

    unknown = _unknown_keys(OmegaConf.to_container(cfg), RunConfig)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}: not in the schema (d2f/config.py)")
    return OmegaConf.to_object(cfg)


def _unknown_keys(node: dict, schema: type, prefix: str = "") -> list[str]:
    known = {f.name: f.type for f in fields(schema)}
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in known:
            out.append(name)
            continue
        child = _SECTIONS.get(known[key])
        if child is not None and isinstance(value, dict):
            out += _unknown_keys(value, child, f"{name}.")
    return out


# nested sections by their annotation (annotations are strings under `from __future__`)
_SECTIONS = {
    "ModelConfig": ModelConfig,
    "DataConfig": DataConfig,
    "TrainConfig": TrainConfig,
    "NoiseConfig": NoiseConfig,
    "LoraConfig": LoraConfig,
    "CertaintyConfig": CertaintyConfig,
}
