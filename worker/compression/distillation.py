"""Knowledge distillation (Hinton et al. 2015) into a smaller student, on the one training loop.

The teacher is the job's model, of any kind: it only runs forward, so its logits
are computed once for the whole training set. The student is derived from an
eager teacher ("auto", structured width reduction with torch-pruning), built from
a registered architecture, or another uploaded model. With `baseline`, a copy of
the initial student is trained on labels alone with the same budget and seed,
so the report shows what distillation bought.

`transfer_augmentation` ("mixup", "noise" or "none", the default) adds one augmented
view of every batch, labelled by the teacher on that same view (consistent teaching,
Beyer et al. 2022); the hard-label term stays on the clean samples. It is off by
default: on digits (untrained 64-32-10 student, 80 epochs) the student alone already
matches the 97.4-97.6% teacher, and neither view helped there (5 seeds, 3 teachers:
mixup 0.2-0.6 points below plain KD, noise no better), so it is for students with
room to learn more from the teacher than from the labels.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modelpress.configs import HintonConfig
from worker.compression import distillation_sweep as kd_sweep
from worker.compression.base import Dataset, EngineError, StageContext, StageResult
from worker.compression.distillation_losses import (
    FEATURE_LOSS_WEIGHT,
    MIXUP_ALPHA,
    NOISE_SCALE,
    FeatureMatcher,
    HintonLoss,
    TransferAugmentation,
    predict_logits,
)
from worker.compression.distillation_students import StudentWithAdapters, _attach_features, _build_student
from worker.compression.inputs import Batch
from worker.compression.training import (
    TrainConfig,
    evaluate_accuracy,
    fit,
    logits_of,
    module_device,
    set_training_mode,
    split_dataset,
)

# The losses and the students live in distillation_losses and distillation_students; their names stay importable here.
__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_TRAIN",
    "DEFAULT_VAL_SPLIT",
    "FEATURE_LOSS_WEIGHT",
    "MIXUP_ALPHA",
    "NOISE_SCALE",
    "SCHEMES",
    "DistillConfig",
    "FeatureMatcher",
    "HintonLoss",
    "StudentWithAdapters",
    "TransferAugmentation",
    "predict_logits",
    "run_stage",
]

SCHEMES = ("hinton",)
# The training budget under the job spec's "train" object. A student trained from
# scratch needs more than a fine-tune: on digits (MLP 64-300-100-10 teacher, untrained
# 64-32-10 student) this brings the student within a point of the teacher in about
# 1.5 s of CPU per run; 20-40 epochs leave it 1.5-6 points short.
DEFAULT_TRAIN: dict[str, Any] = {"optimizer": "adamw", "lr": 3e-3, "epochs": 80, "batch_size": 64, "schedule": "cosine"}
# Option defaults come from the stage's typed config, so the API and the engine never disagree.
_DEFAULTS: dict[str, Any] = HintonConfig().options()
# Share of the training data held out to report accuracies when there is no eval set.
DEFAULT_VAL_SPLIT = 0.1
AUGMENTATIONS = ("mixup", "noise", "none")


@dataclass(frozen=True)
class DistillConfig:
    """Validated options of the distill/hinton stage (see HintonConfig in modelpress.configs)."""

    student: str | dict[str, Any] = _DEFAULTS["student"]
    width_multiplier: float = _DEFAULTS["width_multiplier"]
    temperature: float = _DEFAULTS["temperature"]
    alpha: float = _DEFAULTS["alpha"]
    baseline: bool = _DEFAULTS["baseline"]
    feature_layers: dict[str, str] | None = None
    transfer_augmentation: str = _DEFAULTS["transfer_augmentation"]
    sweep: bool = _DEFAULTS["sweep"]
    sweep_time_budget_s: float = _DEFAULTS["sweep_time_budget_s"]
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DistillConfig:
        """Check the stage options; the "train" object gets `DEFAULT_TRAIN` under it.

        Example:
            >>> DistillConfig.from_options({"student": "auto", "width_multiplier": 0.5})
        """
        known = {
            "student",
            "width_multiplier",
            "temperature",
            "alpha",
            "baseline",
            "feature_layers",
            "transfer_augmentation",
            "sweep",
            "sweep_time_budget_s",
            "train",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            raise EngineError(f"unknown distill option(s) {unknown}; known: {sorted(known)}")
        given = {k: v for k, v in options.items() if v is not None}
        given = {**{k: v for k, v in _DEFAULTS.items() if v is not None}, **given}
        student = given["student"]
        if student != "auto" and not (
            isinstance(student, dict)
            and (isinstance(student.get("model_id"), str) or isinstance(student.get("architecture"), dict))
        ):
            raise EngineError(
                'student must be "auto", {"model_id": "..."} or {"architecture": {"name": ..., "kwargs": {...}}}'
            )
        width, temperature, alpha = given["width_multiplier"], given["temperature"], given["alpha"]
        if not _is_number(width) or not 0 < width <= 1:
            raise EngineError(f"width_multiplier must be in (0, 1], got {width!r}")
        if not _is_number(temperature) or temperature <= 0:
            raise EngineError(f"temperature must be a positive number, got {temperature!r}")
        if not _is_number(alpha) or not 0 <= alpha <= 1:
            raise EngineError(f"alpha must be in [0, 1], got {alpha!r}")
        baseline = given["baseline"]
        if not isinstance(baseline, bool):
            raise EngineError("baseline must be true or false")
        features = given.get("feature_layers")
        if features is not None and (
            not isinstance(features, dict)
            or not features
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in features.items())
        ):
            raise EngineError('feature_layers must be a non-empty object {"teacher_module": "student_module"}')
        augmentation = given["transfer_augmentation"]
        if augmentation not in AUGMENTATIONS:
            raise EngineError(f"transfer_augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
        return cls(
            student=student,
            width_multiplier=float(width),
            temperature=float(temperature),
            alpha=float(alpha),
            baseline=baseline,
            feature_layers=features,
            transfer_augmentation=augmentation,
            sweep=bool(given["sweep"]),
            sweep_time_budget_s=float(given["sweep_time_budget_s"]),
            train=TrainConfig.from_options(given.get("train"), DEFAULT_TRAIN),
        )


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Distill the teacher `model` into a student trained on ctx.train_data.

    Args:
        model: the teacher, of kind ctx.kind; it only runs forward, under no_grad.
        scheme: "hinton".
        options: student, width_multiplier, temperature, alpha, baseline, feature_layers,
            transfer_augmentation, train.
        ctx: training (and optional evaluation) data, device, seed, progress and cancellation.
    Returns:
        The trained student, its kind, and info with student/baseline/teacher accuracies,
        parameter counts and the training summary.
    Example:
        >>> run_stage(teacher, "hinton", {"student": "auto", "width_multiplier": 0.25, "baseline": True}, ctx)
    """
    if scheme not in SCHEMES:
        raise EngineError(f"unknown distill scheme {scheme!r}; known: {list(SCHEMES)}")
    config = DistillConfig.from_options(options)
    data = ctx.train_data
    if data is None or len(data) == 0:
        raise EngineError("distillation needs a training dataset")
    teacher = model
    set_training_mode(teacher, False)
    student, student_kind, source = _build_student(teacher, config, ctx)
    num_classes = _check_dataset(teacher, student, data, "training")
    if ctx.eval_data is not None:
        _check_dataset(teacher, student, ctx.eval_data, "evaluation")
    if config.baseline and data.labels is None:
        raise EngineError("baseline trains the student on labels alone, so it needs a dataset with labels")
    if config.feature_layers and (ctx.kind != "eager" or student_kind != "eager"):
        raise EngineError(
            "feature_layers needs an eager teacher and an eager student "
            f"(here: teacher {ctx.kind}, student {student_kind}); hooks do not run inside "
            "TorchScript or exported graphs"
        )
    ctx.progress(0.0, "computing teacher logits")
    teacher_logits = predict_logits(teacher, data.inputs, ctx.device)
    with_labels = data.labels is not None
    # One targets tensor, so the training loop slices labels and teacher logits together.
    targets = (
        teacher_logits if data.labels is None else torch.cat([data.labels.float().unsqueeze(1), teacher_logits], dim=1)
    )
    train, train_targets, val, val_targets = _hold_out(data, targets, config, ctx)
    evaluation = ctx.eval_data if ctx.eval_data is not None else val
    train_config = config.train

    augmentation = config.transfer_augmentation
    if augmentation != "none" and not train.inputs.is_floating_point():
        raise EngineError(
            f"transfer_augmentation {augmentation!r} needs floating-point inputs, "
            f'these are {train.inputs.dtype}: use "none"'
        )
    teacher_device = module_device(teacher)
    # With labels: the baseline and a small sweep over (temperature, alpha), best one delivered (distillation_sweep)
    compare = with_labels and evaluation is not None and evaluation.labels is not None
    candidates = kd_sweep.settings(config.temperature, config.alpha, compare and config.sweep)
    initial_student = copy.deepcopy(student) if (config.baseline or compare) else None
    share = 1.0 / (len(candidates) + (1 if initial_student is not None else 0))
    runs: list[kd_sweep.Run] = []
    students: list[nn.Module] = []
    started = time.monotonic()
    for number, (temperature, alpha) in enumerate(candidates):
        if number > 0 and not kd_sweep.fits_budget(runs, time.monotonic() - started, config.sweep_time_budget_s):
            break
        candidate = student if number == 0 else copy.deepcopy(initial_student)
        assert candidate is not None  # more than one candidate implies compare, so initial_student was kept
        trained, features = _attach_features(teacher, candidate, config, train.inputs[:2])
        augment = (
            TransferAugmentation(augmentation, teacher, float(train.inputs.float().std()))
            if augmentation != "none"
            else None
        )
        loss = HintonLoss(
            temperature,
            alpha,
            with_labels=with_labels,
            label_smoothing=train_config.label_smoothing,
            features=features,
            augment=augment,
        )
        name = "student" if number == 0 else f"sweep T={temperature:g},alpha={alpha:g}"
        run_started = time.monotonic()
        try:
            summary = fit(
                trained,
                train,
                train_config,
                _scaled(ctx, number * share, share, name),
                loss_fn=loss,
                val_data=val,
                targets=train_targets,
                val_targets=val_targets,
            )
        finally:
            if features is not None:
                features.remove_hooks()
            if features is not None or augment is not None:
                teacher.to(teacher_device)  # feature matching or augmentation ran it on the training device
        accuracy = evaluate_accuracy(candidate, evaluation) if compare and evaluation is not None else None
        runs.append(kd_sweep.Run(name, temperature, alpha, accuracy, time.monotonic() - run_started, summary))
        students.append(candidate)

    info: dict[str, Any] = {
        "student_source": source,
        "temperature": config.temperature,
        "alpha": config.alpha if with_labels else None,
        "label_free": not with_labels,
        "feature_layers": config.feature_layers,
        "transfer_augmentation": augmentation,
        "num_classes": num_classes,
        "teacher_parameters": _count_parameters(teacher),
        "student_parameters": _count_parameters(student),
        "training": runs[0].training,
        "evaluated_on": None,
        "student_accuracy": None,
        "baseline_accuracy": None,
        "teacher_accuracy": None,
    }
    delivered = student
    if initial_student is not None:
        baseline_started = time.monotonic()
        info["baseline_training"] = fit(
            initial_student, train, train_config, _scaled(ctx, 1.0 - share, share, "baseline"), val_data=val
        )
        baseline_seconds = time.monotonic() - baseline_started
    if evaluation is not None and evaluation.labels is not None:
        info["evaluated_on"] = "eval_data" if ctx.eval_data is not None else "validation_split"
        info["teacher_accuracy"] = evaluate_accuracy(teacher, evaluation)
        info["baseline_accuracy"] = (
            evaluate_accuracy(initial_student, evaluation) if initial_student is not None else None
        )
        if compare and initial_student is not None:
            baseline = kd_sweep.Run(
                "baseline", None, None, info["baseline_accuracy"], baseline_seconds, info["baseline_training"]
            )
            chosen, warnings = kd_sweep.choose(baseline, runs)
            delivered = initial_student if chosen is baseline else students[runs.index(chosen)]
            info["runs"] = [baseline.describe()] + [run.describe() for run in runs]
            info["delivered"] = chosen.name
            info["selected_on"] = info["evaluated_on"]
            info["warnings"] = warnings
            if chosen is not baseline:
                info["temperature"], info["alpha"], info["training"] = chosen.temperature, chosen.alpha, chosen.training
        info["student_accuracy"] = evaluate_accuracy(delivered, evaluation)
    ctx.progress(1.0, "distillation done")
    return StageResult(model=delivered, kind=student_kind, info=info)


# ---------------------------------------------------------------- checks and helpers


def _check_dataset(teacher: nn.Module, student: nn.Module, data: Dataset, which: str) -> int:
    """The number of classes; EngineError when the data does not fit the teacher or the student."""
    if len(data) == 0:
        raise EngineError(f"the {which} dataset is empty")
    probe = data.inputs[:2]
    shape = f"inputs of shape {list(data.inputs.shape[1:])} and dtype {data.inputs.dtype}"
    teacher_out = _probe(teacher, probe, f"the {which} dataset ({shape}) does not fit the teacher")
    student_out = _probe(student, probe, f"the {which} dataset ({shape}) does not fit the student")
    if teacher_out.dim() != 2:
        raise EngineError(f"the teacher must output (batch, classes) logits, got shape {list(teacher_out.shape)}")
    num_classes = int(teacher_out.shape[1])
    if student_out.shape != teacher_out.shape:
        raise EngineError(
            f"the student outputs shape {list(student_out.shape[1:])} but the teacher "
            f"{list(teacher_out.shape[1:])}: they must predict the same classes"
        )
    if data.labels is not None:
        low, high = int(data.labels.min()), int(data.labels.max())
        if low < 0 or high >= num_classes:
            raise EngineError(
                f"the {which} labels span [{low}, {high}] but the teacher has {num_classes} "
                f"classes (labels must be in [0, {num_classes - 1}])"
            )
    return num_classes


def _probe(model: nn.Module, inputs: Batch, message: str) -> Tensor:
    try:
        with torch.no_grad():
            return logits_of(model(inputs.to(module_device(model))))
    except EngineError:
        raise
    except Exception as error:
        raise EngineError(f"{message}: {str(error).strip().splitlines()[-1]}") from error


def _hold_out(
    data: Dataset, targets: Tensor, config: DistillConfig, ctx: StageContext
) -> tuple[Dataset, Tensor, Dataset | None, Tensor | None]:
    """Train and validation parts: a validation split reports accuracies when there is no eval set."""
    fraction = config.train.val_split
    if fraction is None:
        needs_split = ctx.eval_data is None or config.train.early_stopping_patience is not None
        fraction = DEFAULT_VAL_SPLIT if needs_split else 0.0
    seed = config.train.seed if config.train.seed is not None else ctx.seed
    (train, train_targets), (val, val_targets) = split_dataset(data, targets, fraction, seed)
    if len(train) == 0:
        raise EngineError("train.val_split leaves no training samples")
    assert train_targets is not None
    return train, train_targets, val, val_targets


def _scaled(ctx: StageContext, offset: float, weight: float, label: str) -> StageContext:
    """ctx with progress mapped into [offset, offset + weight] of the stage, events labelled with the run."""
    return dataclasses.replace(
        ctx,
        progress=lambda fraction, message: ctx.progress(offset + weight * fraction, f"{label}: {message}"),
        event=lambda kind, data: ctx.event(kind, {**data, "run": label}),
    )


def _count_parameters(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
