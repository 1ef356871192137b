"""Presets of the end-to-end pipeline: model, data sizes, training settings per stage, mining.

`micro` runs in seconds (tests), `tiny` in minutes on a 2-core CPU, `small` is a longer CPU run and
`vggt1b` fine-tunes the official VGGT-1B on a GPU from a local checkpoint (no pre-training).
The LoRA scale follows the paper: alpha = 2 r, so s = 2 for every adapter and bank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

from attrspace.data import ATTRIBUTES, DOWNSTREAM_TASKS
from attrspace.mining.subspaces import MiningConfig
from attrspace.models.vggt.config import VGGTConfig
from attrspace.train.config import (
    AdapterSettings,
    ConfigError,
    FinetuneConfig,
    OptimSettings,
    TrainSettings,
)
from attrspace.train.trainer import TrainConfig

# Fine-tuning methods: the paper's four and the three controls of the comparison.
METHODS = ("zero-shot", "full", "lora", "subspace", "psv", "random", "single", "heads")
METHOD_TITLES = {
    "zero-shot": "zero-shot (base model)",
    "full": "full fine-tuning",
    "lora": "LoRA",
    "subspace": "mined subspace bank",
    "psv": "PSV control (top singular vectors of W0)",
    "random": "RANDOM control (random orthonormal bank)",
    "single": "single-attribute bank",
    "heads": "heads-only LoRA (what every bank method trains besides M)",
}


@dataclass(frozen=True)
class DataSizes:
    """How much synthetic data each stage renders (all views of a scene share one image size).

    pretrain_datasets x pretrain_scenes scenes of the "mixed" family pre-train the base model;
    loras_per_attribute datasets of lora_scenes scenes per attribute family (one LoRA each);
    per downstream task, task_train_scenes scenes to fine-tune on and task_test_scenes to evaluate;
    content_streams: where an attribute family's fixed attributes come from (data/families.py: 1,
    the family's own stream; C > 1, cross-family content stream d mod C for dataset d).
    """

    image_size: int
    views: int
    pretrain_datasets: int
    pretrain_scenes: int
    loras_per_attribute: int
    lora_scenes: int
    task_train_scenes: int
    task_test_scenes: int
    content_streams: int = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataSizes.{f.name} must be a positive int, got {value!r}")
        if self.views < 2:
            raise ValueError(
                f"DataSizes.views must be >= 2 (camera metrics need pairs), got {self.views}"
            )


# Bank-only arms of the study (the bank on the block linears, no heads' LoRA): which bank. The
# shuffled and random banks are drawn afresh for every seed (seed i uses draw i), so the seed
# component of a comparison carries the spread of the control's draws.
STUDY_BANKS = ("mined", "shuffled", "pooled", "random", "psv")
# Arms of the study that train LoRA or every parameter; "block-lora" is LoRA r on the block
# linears only (gate G0 compares it with "lora"), "heads" LoRA r on the heads only.
STUDY_METHODS = ("zero-shot", "full", "lora", "block-lora", "heads", "subspace")
# Starting learning-rate grids per kind of arm (widened by factors of 3 until the best is inside).
STUDY_LR_GRIDS = (
    ("full", (1e-4, 3e-4, 1e-3)),
    ("adapter", (1e-3, 3e-3, 1e-2)),
    ("bank", (3e-2, 1e-1, 3e-1)),
)


def study_arm_kind(arm: str) -> str:
    """The learning-rate grid an arm starts from: full, adapter (LoRA) or bank (M; for "subspace"
    the grid is M's, its heads' LoRA keeps the heads arm's rate)."""
    if arm == "full":
        return "full"
    if arm.startswith("bank:") or arm == "subspace":
        return "bank"
    return "adapter"


@dataclass(frozen=True)
class StudyConfig:
    """The controlled test of the paper's claims (pipeline/study/): fine-tuning arms on `task`,
    each with `seeds` data-order (and adapter-init) seeds; `lora_sets` independent sets of
    attribute LoRAs (set 0 is the LoRA stage's; seed i uses set i mod lora_sets); every arm's
    learning rate chosen on `val_scenes` validation scenes (after the train scenes, before the test
    scenes) from STUDY_LR_GRIDS, widened at most `widen` times per side; `permutations` label
    permutations in the specificity test; `perturbation`: the relative size of the random
    perturbation of the block linears in gate G0; `endpoint_points`: points per cloud in the
    secondary endpoints."""

    task: str = "microbaseline"
    seeds: int = 5
    lora_sets: int = 2
    val_scenes: int = 12
    permutations: int = 999
    widen: int = 3
    perturbation: float = 0.5
    endpoint_points: int = 2048

    def __post_init__(self) -> None:
        if self.task not in DOWNSTREAM_TASKS:
            raise ValueError(f"study task must be one of {DOWNSTREAM_TASKS}, got {self.task!r}")
        for label, value, lo in (
            ("seeds", self.seeds, 2),
            ("lora_sets", self.lora_sets, 1),
            ("val_scenes", self.val_scenes, 2),
            ("permutations", self.permutations, 1),
            ("widen", self.widen, 0),
            ("endpoint_points", self.endpoint_points, 16),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"StudyConfig.{label} must be an int >= {lo}, got {value!r}")
        if not 0 < self.perturbation:
            raise ValueError(f"StudyConfig.perturbation must be > 0, got {self.perturbation}")

    def arms(self) -> tuple[str, ...]:
        """Every arm's name: the methods, then "bank:<bank>" for the bank-only arms."""
        return STUDY_METHODS + tuple(f"bank:{b}" for b in STUDY_BANKS)


@dataclass(frozen=True)
class Preset:
    """Everything one pipeline run depends on.

    pretrain None: the base model is a checkpoint given at run time (vggt1b). lora_alpha defaults to
    2 * lora_rank. finetune is the one trainer setting of every fine-tuning method; full fine-tuning
    uses the same steps and schedule with its own peak lr `full_lr` (every parameter moves, so the
    adapters' lr would wreck it). single_attribute: the attribute of the single-attribute control.
    threads: torch intra-op threads (0 keeps torch's default). eval_points: points per cloud in the
    point-cloud metrics (a seeded subsample). device: "auto" picks CUDA when present. study: when
    set, the run ends with the controlled study of the paper's claims (pipeline/study/).
    """

    name: str
    model: VGGTConfig
    data: DataSizes
    pretrain: TrainConfig | None
    lora: TrainConfig
    lora_rank: int
    mining: MiningConfig
    finetune: TrainConfig
    full_lr: float
    lora_alpha: float = 0.0
    attributes: tuple[str, ...] = ATTRIBUTES
    tasks: tuple[str, ...] = DOWNSTREAM_TASKS
    methods: tuple[str, ...] = METHODS
    single_attribute: str = "geometry"
    seed: int = 0
    threads: int = 0
    eval_points: int = 4096
    device: str = "auto"
    study: StudyConfig | None = None
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.model.enable_point:
            raise ValueError("the pipeline trains camera + depth heads: use enable_point=False")
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"image_size {self.data.image_size} is not a multiple of the patch size "
                f"{self.model.patch_size}"
            )
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha == 0.0:
            object.__setattr__(self, "lora_alpha", 2.0 * self.lora_rank)
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.full_lr <= 0:
            raise ValueError(f"full_lr must be positive, got {self.full_lr}")
        for label, values, allowed in (
            ("attributes", self.attributes, ATTRIBUTES),
            ("tasks", self.tasks, DOWNSTREAM_TASKS),
            ("methods", self.methods, METHODS),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) != len(values):
                raise ValueError(
                    f"{label} must be distinct names from {allowed}, got {tuple(values)}"
                )
        if "single" in self.methods and self.single_attribute not in self.attributes:
            raise ValueError(
                f"single_attribute {self.single_attribute!r} is not one of the attributes "
                f"{self.attributes}"
            )
        if self.threads < 0 or self.eval_points < 16:
            raise ValueError("threads must be >= 0 and eval_points >= 16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.study is not None:
            if self.study.task not in self.tasks:
                raise ValueError(
                    f"study task {self.study.task!r} is not one of the tasks {self.tasks}"
                )
            if self.single_attribute not in self.attributes or len(self.attributes) < 2:
                raise ValueError(
                    "the study needs >= 2 attributes, single_attribute among them; got "
                    f"{self.attributes}, {self.single_attribute!r}"
                )
            if self.data.task_test_scenes < self.study.val_scenes + 2:
                raise ValueError(
                    f"task_test_scenes {self.data.task_test_scenes} must hold the study's "
                    f"{self.study.val_scenes} validation scenes and >= 2 test scenes"
                )
            if self.data.loras_per_attribute < 2:
                raise ValueError("the study needs >= 2 LoRAs per attribute (held-out capture)")

    @property
    def needs_checkpoint(self) -> bool:
        return self.pretrain is None

    def replace(self, **changes) -> Preset:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _micro() -> Preset:
    return Preset(
        name="micro",
        model=VGGTConfig.tiny(enable_point=False),
        data=DataSizes(28, 2, 1, 3, 2, 2, 2, 1),
        pretrain=TrainConfig(steps=3, lr=1e-3, batch_size=1),
        lora=TrainConfig(steps=2, lr=1e-3, batch_size=1),
        lora_rank=2,
        mining=MiningConfig(rank="cliff", rank_cap=2, max_iters=5),
        finetune=TrainConfig(steps=2, lr=1e-3, batch_size=1),
        full_lr=1e-4,
        attributes=("texture", "camera"),
        tasks=("photo",),
        single_attribute="camera",
        eval_points=256,
        threads=1,
        notes="for tests: every stage at the smallest sizes",
    )


def _tiny() -> Preset:
    return Preset(
        name="tiny",
        model=VGGTConfig.tiny(enable_point=False),
        data=DataSizes(
            image_size=56,
            views=4,
            pretrain_datasets=8,
            pretrain_scenes=16,
            loras_per_attribute=5,
            lora_scenes=8,
            task_train_scenes=16,
            task_test_scenes=12,
        ),
        pretrain=TrainConfig(steps=1000, lr=1e-3, batch_size=2, warmup=0.05),
        lora=TrainConfig(steps=60, lr=2e-3, batch_size=2),
        lora_rank=8,
        # Short LoRA runs give smooth spectra without a cliff, so a fixed d per attribute (as the
        # release's "uniform" banks) rather than the cliff rule, which would pick noise.
        mining=MiningConfig(rank=4),
        finetune=TrainConfig(steps=100, lr=2e-3, batch_size=2),
        full_lr=2e-4,
        tasks=("microbaseline", "photo"),
        threads=1,
        notes="2-core CPU, minutes end to end",
    )


def _small() -> Preset:
    return Preset(
        name="small",
        model=VGGTConfig.small(enable_point=False),
        data=DataSizes(
            image_size=112,
            views=4,
            pretrain_datasets=16,
            pretrain_scenes=32,
            loras_per_attribute=10,
            lora_scenes=16,
            task_train_scenes=32,
            task_test_scenes=16,
        ),
        pretrain=TrainConfig(steps=6000, lr=5e-4, batch_size=2),
        lora=TrainConfig(steps=200, lr=1e-3, batch_size=2),
        lora_rank=16,
        mining=MiningConfig(rank="cliff", rank_cap=12),
        finetune=TrainConfig(steps=400, lr=1e-3, batch_size=2),
        full_lr=1e-4,
        notes="CPU, hours",
    )


def _vggt1b() -> Preset:
    return Preset(
        name="vggt1b",
        model=VGGTConfig.vggt_1b(enable_point=False, gradient_checkpointing=True),
        data=DataSizes(
            image_size=224,
            views=4,
            pretrain_datasets=1,
            pretrain_scenes=1,
            loras_per_attribute=10,
            lora_scenes=16,
            task_train_scenes=48,
            task_test_scenes=16,
        ),
        pretrain=None,
        lora=TrainConfig(steps=400, lr=1e-4, batch_size=1),
        lora_rank=16,
        mining=MiningConfig(rank="cliff", rank_cap=16),
        finetune=TrainConfig(steps=1000, lr=1e-4, batch_size=1),
        full_lr=1e-5,
        device="cuda",
        eval_points=20000,
        notes="GPU; needs --checkpoint to the official VGGT-1B weights (no pre-training)",
    )


def _study() -> Preset:
    # See docs/study/protocol.md for the sizes and what they trade. The base: LayerScale starts at
    # 1 (not VGGT's 0.01), so the aggregator blocks carry the prediction (gate G0).
    tiny = _tiny()
    return tiny.replace(
        name="study",
        model=VGGTConfig.tiny(enable_point=False, init_values=STUDY_INIT_VALUES),
        data=DataSizes(
            image_size=56,
            views=4,
            pretrain_datasets=8,
            pretrain_scenes=16,
            loras_per_attribute=4,
            lora_scenes=8,
            task_train_scenes=16,
            task_test_scenes=12 + 24,
            content_streams=4,
        ),
        pretrain=replace(tiny.pretrain, steps=STUDY_PRETRAIN_STEPS),
        lora=TrainConfig(steps=STUDY_LORA_STEPS, lr=STUDY_LORA_LR, batch_size=2),
        lora_rank=16,
        finetune=TrainConfig(steps=STUDY_FINETUNE_STEPS, lr=2e-3, batch_size=2),
        tasks=("microbaseline",),
        methods=("zero-shot",),
        study=StudyConfig(seeds=5, lora_sets=2, val_scenes=12),
        notes="the controlled study of the paper's claims; 2-core CPU, about an hour",
    )


STUDY_LORA_STEPS, STUDY_LORA_LR = 120, 5e-3
STUDY_PRETRAIN_STEPS, STUDY_FINETUNE_STEPS, STUDY_INIT_VALUES = 1000, 100, 1.0

PRESETS = {
    "micro": _micro,
    "tiny": _tiny,
    "small": _small,
    "vggt1b": _vggt1b,
    "study": _study,
}


def reduced_study() -> Preset:
    """The study at micro sizes (2 seeds, 2 LoRA sets, grids widened at most once): the test suite
    runs it end to end."""
    micro = _micro()
    return micro.replace(
        name="study-micro",
        model=micro.model.replace(init_values=STUDY_INIT_VALUES),
        data=DataSizes(28, 2, 1, 3, 3, 2, 2, 3 + 3, content_streams=3),
        tasks=("microbaseline",),
        methods=("zero-shot",),
        study=StudyConfig(
            seeds=2, lora_sets=2, val_scenes=3, permutations=49, widen=1, endpoint_points=64
        ),
    )


# What the pipeline's fine-tuning stage takes from a FinetuneConfig (`apply_finetune_config`);
# every other key belongs to `attrspace finetune --data` runs.
PIPELINE_KEYS = (
    "optim.lr_m",
    "optim.lr_full",
    "optim.weight_decay",
    "optim.clip",
    "optim.warmup",
    "optim.final_lr_ratio",
    "train.steps",
    "train.batch_size",
    *(f"loss.{f.name}" for f in dataclasses.fields(TrainConfig().loss)),
)


def preset_defaults(preset: Preset) -> FinetuneConfig:
    """The preset's fine-tuning setting as a FinetuneConfig: what `attrspace config --preset NAME`
    prints and the defaults of `attrspace finetune --data ... --preset NAME`."""
    ft = preset.finetune
    return FinetuneConfig(
        optim=OptimSettings(
            lr_m=ft.lr,
            lr_lora=ft.lr,
            lr_full=preset.full_lr,
            weight_decay=ft.weight_decay,
            clip=ft.clip,
            warmup=ft.warmup,
            final_lr_ratio=ft.final_lr_ratio,
        ),
        train=TrainSettings(
            steps=ft.steps,
            batch_size=ft.batch_size,
            seed=preset.seed,
            gradient_checkpointing=preset.model.gradient_checkpointing,
        ),
        adapter=AdapterSettings(lora_rank=preset.lora_rank, lora_alpha=preset.lora_alpha),
        loss=ft.loss,
    )


def _flat(config: FinetuneConfig) -> dict[str, object]:
    return {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items()}


def apply_finetune_config(preset: Preset, config: FinetuneConfig) -> Preset:
    """The preset with its fine-tuning stage set from `config` (learning rates, steps, batch,
    schedule, clipping, loss weights: PIPELINE_KEYS). A key outside them that differs from the
    preset's defaults is refused (ConfigError, one line): the pipeline cannot honour it, and
    silently ignoring it would mislabel the run."""
    defaults, wanted = _flat(preset_defaults(preset)), _flat(config)
    changed = [k for k in wanted if wanted[k] != defaults[k]]
    one_lr = wanted["optim.lr_lora"] == wanted["optim.lr_m"]
    refused = [k for k in changed if k not in PIPELINE_KEYS + (("optim.lr_lora",) * one_lr)]
    if refused:
        raise ConfigError(
            f"the pipeline's fine-tuning stage cannot take {refused} (they apply to "
            f"`attrspace finetune --data` runs; in the pipeline optim.lr_m is the lr of M and "
            f"LoRA alike); it takes {list(PIPELINE_KEYS[:8])} and loss.*"
        )
    if not changed:
        return preset
    o, t = config.optim, config.train
    finetune = TrainConfig(
        steps=t.steps,
        lr=o.lr_m,
        weight_decay=o.weight_decay,
        warmup=o.warmup,
        final_lr_ratio=o.final_lr_ratio,
        clip=o.clip,
        batch_size=t.batch_size,
        seed=preset.finetune.seed,
        loss=config.loss,
    )
    return preset.replace(finetune=finetune, full_lr=o.lr_full)


def get_preset(name: str) -> Preset:
    """The named preset (a fresh frozen object)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
    return PRESETS[name]()
