"""The student of a distillation: derived from the teacher, built from a registered architecture
or another uploaded model, and wrapped with the adapters of feature distillation."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from worker.compression.base import EngineError, ModelKind, StageContext, select_layers
from worker.compression.distillation_losses import FeatureMatcher
from worker.compression.inputs import Batch
from worker.compression.training import module_device

if TYPE_CHECKING:
    from worker.compression.distillation import DistillConfig


class StudentWithAdapters(nn.Module):
    """The student plus the learned adapters of feature distillation, so one optimizer trains both."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters

    def forward(self, inputs: Tensor) -> Any:
        return self.student(inputs)


def _build_student(teacher: nn.Module, config: DistillConfig, ctx: StageContext) -> tuple[nn.Module, ModelKind, str]:
    spec = config.student
    if spec == "auto":
        if not isinstance(ctx.example_input, Tensor):
            raise EngineError(
                'student "auto" narrows models that take one input tensor; give a student as '
                '{"architecture": ...} or {"model_id": ...}'
            )
        return _shrink_width(_eager_form(teacher, ctx), config.width_multiplier, ctx.example_input), "eager", "auto"
    assert isinstance(spec, dict)
    if "model_id" in spec:
        model_id = spec["model_id"]
        if model_id not in ctx.extra_models:
            raise EngineError(f"student model {model_id!r} is not among the job's models")
        student, kind = ctx.extra_models[model_id]
        if not any(p.requires_grad for p in student.parameters()):
            raise EngineError(f"student model {model_id!r} has no trainable parameters")
        return copy.deepcopy(student), kind, f"model_id:{model_id}"
    architecture = spec["architecture"]
    name, kwargs = architecture.get("name"), architecture.get("kwargs") or {}
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise EngineError('student.architecture needs "name" (a string) and optional "kwargs" (an object)')
    from worker.compression.registry import build_architecture

    torch.manual_seed(ctx.seed)  # the student's initial weights follow the job's seed
    return build_architecture(name, kwargs), "eager", f"architecture:{name}"


def _eager_form(teacher: nn.Module, ctx: StageContext) -> nn.Module:
    """The teacher as modules torch-pruning can narrow: an exported program (or a TorchScript model,
    converted to one first) has its conv / linear / norm ops lifted to nn modules; eager stays as it is."""
    if ctx.kind == "eager":
        return teacher
    from worker.compression.graph_lift import lift_exported_graph

    graph = teacher
    if ctx.kind == "torchscript":
        from worker.compression.torchscript_conversion import torchscript_to_graph

        graph = torchscript_to_graph(teacher, ctx.signature, ctx.example_input)
    assert isinstance(graph, torch.fx.GraphModule)
    try:
        return lift_exported_graph(graph)
    except EngineError as error:
        raise EngineError(
            f'student "auto" needs the teacher\'s layers as modules to narrow them: {error}; give a student '
            'as {"architecture": ...} or {"model_id": ...}'
        ) from error


def _shrink_width(teacher: nn.Module, width_multiplier: float, example_input: Tensor) -> nn.Module:
    """A copy of the teacher with 1 - width_multiplier of its hidden channels/neurons removed."""
    import torch_pruning as tp

    student = copy.deepcopy(teacher).cpu()
    if width_multiplier >= 1.0:
        return student
    layers = select_layers(student, None, include_classifier=True)
    if len(layers) < 2:
        raise EngineError(
            'student "auto" needs a teacher with hidden layers to narrow; this one has at most one weight layer'
        )
    classifier = layers[-1][1]
    try:
        pruner = tp.pruner.MetaPruner(
            student,
            example_input.cpu(),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=1.0 - width_multiplier,
            ignored_layers=[classifier],
        )
        pruner.step()
    except Exception as error:
        raise EngineError(f'student "auto" could not narrow this architecture: {error}') from error
    return student


def _attach_features(
    teacher: nn.Module, student: nn.Module, config: DistillConfig, probe: Batch
) -> tuple[nn.Module, FeatureMatcher | None]:
    """The module to train (the student, or the student with adapters) and the feature hooks."""
    if not config.feature_layers:
        return student, None
    teacher_modules, student_modules = dict(teacher.named_modules()), dict(student.named_modules())
    pairs = []
    for teacher_name, student_name in config.feature_layers.items():
        if teacher_name not in teacher_modules:
            raise EngineError(f"feature_layers: the teacher has no module {teacher_name!r}")
        if student_name not in student_modules:
            raise EngineError(f"feature_layers: the student has no module {student_name!r}")
        pairs.append((teacher_modules[teacher_name], student_modules[student_name]))
    matcher = FeatureMatcher(teacher, pairs, nn.ModuleList())
    with torch.no_grad():
        teacher(probe.to(module_device(teacher)))
        student(probe.to(module_device(student)))
    adapters = []
    for (teacher_name, student_name), t_out, s_out in zip(
        config.feature_layers.items(), matcher.teacher_outputs, matcher.student_outputs
    ):
        assert t_out is not None and s_out is not None
        adapters.append(_adapter(teacher_name, student_name, t_out, s_out))
    matcher.adapters = nn.ModuleList(adapters).to(module_device(student))
    return StudentWithAdapters(student, matcher.adapters), matcher


def _adapter(teacher_name: str, student_name: str, teacher_out: Tensor, student_out: Tensor) -> nn.Module:
    """Linear map from the student's feature width to the teacher's (1x1 conv for feature maps)."""
    if teacher_out.dim() != student_out.dim() or teacher_out.shape[2:] != student_out.shape[2:]:
        raise EngineError(
            f"feature_layers: teacher {teacher_name!r} gives {list(teacher_out.shape[1:])} and "
            f"student {student_name!r} gives {list(student_out.shape[1:])}; they must match "
            "except in the channel/feature dimension"
        )
    if teacher_out.dim() == 2:
        return nn.Linear(student_out.shape[1], teacher_out.shape[1])
    if teacher_out.dim() in (3, 4, 5):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[teacher_out.dim()]
        return conv(student_out.shape[1], teacher_out.shape[1], kernel_size=1)
    raise EngineError(f"feature_layers: outputs of rank {teacher_out.dim()} are not supported")
