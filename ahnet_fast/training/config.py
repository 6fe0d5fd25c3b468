"""Training configuration: one dataclass, validated before anything expensive starts.

Everything in it is a plain Python value, so the whole configuration is stored in every checkpoint
(readable with ``weights_only=True``) and ``ahnet-fast infer`` rebuilds the model and the
preprocessing from the checkpoint alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ahnet_fast.nn.shapes import ahnet_size_ok, nearest_ahnet_sizes

STAGES = ("2d", "3d", "finetune")
OPTIMIZERS = ("adam", "sgd")
TASKS = ("segmentation", "detection")
AMP = ("off", "bf16", "fp16")
CHECKPOINT_POLICIES = ("none", "encoder", "decoder", "all", "auto")
DEFAULT_CLASS_NAMES = ("background", "liver", "lesion")


@dataclass
class TrainConfig:
    """One training stage.

    stage "2d": MCFCN on three adjacent slices as channels (the paper's first step).
    stage "3d": AHNet whose encoder is transferred from a stage-2d checkpoint (``init``) and frozen
    (weights and BatchNorm statistics); only the decoder trains.
    stage "finetune": every parameter trains; ``init`` is a stage-3d/finetune checkpoint (loaded), a
    stage-2d one (encoder transferred) or None (random initialisation: plain 3D training).

    ``batch`` is the global batch of one optimizer step; ``micro_batch`` the samples of one forward
    pass (BatchNorm statistics are per micro-batch). Under torchrun every rank takes
    batch / world_size samples, in micro-batches; one process with ``micro_batch = batch /
    world_size`` computes the same step as world_size processes. BatchNorm running statistics follow
    one rule whatever the split: once per optimizer step, each moves by the mean of the updates that
    the step's micro-batches (on every rank) would each make on their own, so one process and many
    processes end a step with the same statistics (see :mod:`ahnet_fast.training.distributed`).

    ``optimizer`` is "adam" (default) or "sgd" (with ``momentum``).

    ``task`` "segmentation" (liver and lesions in CT, the default) or "detection" (lesion centres in
    breast tomosynthesis): one output channel regressing a Gaussian heat map around each lesion
    (:func:`ahnet_fast.detection.heatmap_target`), evaluated by FROC of the heat map's peaks
    (non-maximum suppression within ``det_radius_mm``, scores above ``det_threshold``).
    """

    data: str = "synthetic"
    task: str = "segmentation"
    stage: str = "finetune"
    init: str | None = None
    steps: int = 200
    patch: tuple[int, int, int] = (128, 128, 32)
    batch: int = 1
    micro_batch: int | None = None
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9         # sgd only
    weight_decay: float = 0.0
    amp: str = "off"
    checkpoint: str = "none"
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/ahnet"
    resume: bool = False
    num_classes: int = 3
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    psp_block_num: int = 4
    backend: str | None = None
    # data
    data_seed: int = 0
    train_cases: int = 8          # synthetic: volumes generated for training
    val_cases: int = 2            # synthetic: held-out volumes; real data: the last val_cases cases
    max_cases: int | None = None  # real data: read at most this many cases (memory)
    synthetic_size_xy: int = 256
    spacing_xy: float | None = 1.6
    window: tuple[float, float] = (-200.0, 250.0)
    foreground_ratio: float = 0.67
    # detection
    det_radius_mm: float = 5.0    # peaks closer than this to a higher one are the same lesion
    det_threshold: float = 0.05   # heat-map values below this are never candidates
    boxes: str | None = None      # real DBT data: the CSV of lesion boxes or centres (ahnet_fast.data.dbt_files)
    file_paths: str | None = None  # real DBT data in Duke's layout: its file-paths table
    # evaluation and output
    eval_every: int = 0           # 0: only at the end
    save_every: int = 25
    overlap: float = 0.25
    window_batch: int = 1
    progress: bool = True
    plots: bool = True

    def validate(self) -> TrainConfig:
        def bad(msg):
            raise ValueError(f"train: {msg}")

        if self.stage not in STAGES:
            bad(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.task not in TASKS:
            bad(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.task == "detection":
            if self.data != "synthetic" and not self.boxes:
                bad(f"--task detection on the DBT folder {self.data}: give its lesions with --boxes CSV (a box or "
                    "centre per row; see ahnet_fast.data.dbt_files)")
            if self.data == "synthetic" and (self.boxes or self.file_paths):
                bad("--boxes and --file-paths describe a real DBT folder: give it with --data DIR")
            if not (self.det_radius_mm > 0 and 0 <= self.det_threshold < 1):
                bad(f"--det-radius-mm must be positive and --det-threshold in [0, 1), got {self.det_radius_mm} "
                    f"and {self.det_threshold}")
        elif self.boxes or self.file_paths:
            bad("--boxes and --file-paths are for --task detection")
        if self.optimizer not in OPTIMIZERS:
            bad(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            bad(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.amp not in AMP:
            bad(f"--amp must be one of {AMP}, got {self.amp!r}")
        if self.checkpoint not in CHECKPOINT_POLICIES:
            bad(f"--checkpoint must be one of {CHECKPOINT_POLICIES}, got {self.checkpoint!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"--device must be cpu or cuda, got {self.device!r}")
        if self.amp == "fp16" and self.device == "cpu":
            bad("--amp fp16 is for CUDA; on CPU use --amp bf16 (CPU kernels have no fp16 path)")
        if self.stage == "3d" and not self.init:
            bad("--stage 3d transfers a trained 2D encoder: give --init DIR/last.pt of a stage-2d run")
        for name in ("steps", "batch", "num_classes", "save_every", "window_batch"):
            if int(getattr(self, name)) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            bad(f"--num-classes must be >= 2 (background + at least one class), got {self.num_classes}")
        if self.eval_every < 0:
            bad(f"--eval-every must be >= 0, got {self.eval_every}")
        if not self.lr > 0:
            bad(f"--lr must be positive, got {self.lr}")
        if len(self.patch) != 3 or any(int(p) < 1 for p in self.patch):
            bad(f"--patch takes three positive sizes H W D, got {self.patch}")
        if not 0.0 <= self.foreground_ratio <= 1.0:
            bad(f"--foreground-ratio must be in [0, 1], got {self.foreground_ratio}")
        if not 0.0 <= self.overlap < 1.0:
            bad(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.psp_block_num not in range(5):
            bad(f"--psp-block-num must be 0..4, got {self.psp_block_num}")
        if self.window[0] >= self.window[1]:
            bad(f"--window LOW HIGH needs LOW < HIGH, got {self.window}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch % self.micro_batch):
            bad(f"--micro-batch must divide --batch ({self.batch}), got {self.micro_batch}")
        if self.val_cases < 1:
            bad(f"--val-cases must be >= 1 (held-out volumes for the final Dice), got {self.val_cases}")
        if self.train_cases < 1:
            bad(f"--train-cases must be >= 1, got {self.train_cases}")
        if self.max_cases is not None and self.max_cases < self.val_cases + 1:
            bad(f"--max-cases must leave at least one training case after the {self.val_cases} held out "
                f"(--val-cases), got {self.max_cases}")
        if len(self.class_names) != self.num_classes:
            if tuple(self.class_names) == DEFAULT_CLASS_NAMES:
                self.class_names = ("background",) + tuple(f"class{i}" for i in range(1, self.num_classes))
            else:
                bad(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.stage != "2d":
            kinds = ("in-plane", "in-plane", "slice")
            for axis, (n, kind) in enumerate(zip(self.patch, kinds)):
                if not ahnet_size_ok(int(n), kind, self.psp_block_num, "transpose"):
                    lo, hi = nearest_ahnet_sizes(int(n), kind, self.psp_block_num, "transpose")
                    nearest = f"nearest sizes that do: {lo} or {hi}" if lo is not None else \
                        f"the smallest size that does: {hi}"
                    bad(f"--patch size {n} on axis {axis} ({kind}) does not fit AHNet with psp_block_num="
                        f"{self.psp_block_num}; {nearest} (in-plane sizes are multiples of 128 at psp_block_num "
                        f"4, 64 at 3, 32 below; the slice size a multiple of 32)")
        self.patch = tuple(int(p) for p in self.patch)
        self.window = (float(self.window[0]), float(self.window[1]))
        self.class_names = tuple(self.class_names)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch"] = list(self.patch)
        d["window"] = list(self.window)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("patch", "window", "class_names"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
