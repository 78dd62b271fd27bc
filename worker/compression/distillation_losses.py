"""The distillation objective and the teacher's side of it: the Hinton loss, teacher-labelled
augmented views, feature matching and the teacher's precomputed logits."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from worker.compression.base import EngineError
from worker.compression.inputs import Batch
from worker.compression.training import logits_of, module_device

# Weight of the feature-matching MSE next to the logit loss.
FEATURE_LOSS_WEIGHT = 1.0
# Mixing weights of "mixup" views are drawn per sample from Beta(MIXUP_ALPHA, MIXUP_ALPHA).
MIXUP_ALPHA = 1.0
# Standard deviation of "noise" views, relative to the training inputs' standard deviation.
NOISE_SCALE = 0.1
_PREDICT_BATCH = 256


class HintonLoss:
    """alpha · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − alpha) · CE(y, z_s), plus feature MSE.

    Targets are the precomputed teacher logits, with the label in column 0 when there
    are labels; without labels only the soft term is used (label-free distillation).
    """

    def __init__(
        self,
        temperature: float,
        alpha: float,
        *,
        with_labels: bool,
        label_smoothing: float = 0.0,
        features: FeatureMatcher | None = None,
        augment: TransferAugmentation | None = None,
    ) -> None:
        self.temperature, self.alpha, self.with_labels = temperature, alpha, with_labels
        self.label_smoothing, self.features, self.augment = label_smoothing, features, augment

    def __call__(self, model: nn.Module, inputs: Batch, targets: Tensor | None) -> Tensor:
        assert isinstance(inputs, Tensor)  # distillation concatenates views of one input tensor
        if targets is None:
            raise EngineError("distillation needs the teacher's logits as targets")
        teacher_logits = (targets[:, 1:] if self.with_labels else targets).float()
        batch = int(inputs.shape[0])
        augment = self.augment if torch.is_grad_enabled() else None  # not in validation (no_grad)
        if augment is not None:
            # Clean batch plus one augmented view of it; the teacher labels the view.
            views = augment.views(inputs)
            inputs = torch.cat([inputs, views])
            if self.features is None:
                teacher_logits = torch.cat([teacher_logits, augment.teacher_logits(views)])
        if self.features is not None:
            self.features.run_teacher(inputs)
            if augment is not None:
                teacher_logits = self.features.teacher_logits()
        student_logits = logits_of(model(inputs)).float()
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        if self.with_labels:
            hard = F.cross_entropy(student_logits[:batch], targets[:, 0].long(), label_smoothing=self.label_smoothing)
            loss = self.alpha * soft + (1 - self.alpha) * hard
        else:
            loss = soft
        if self.features is not None:
            loss = loss + FEATURE_LOSS_WEIGHT * self.features.loss()
        return loss


class TransferAugmentation:
    """Teacher-labelled views of a batch (Beyer et al. 2022, "a good teacher is patient and consistent").

    "mixup" blends each sample with another of the batch (weight ~ Beta(1, 1) per sample),
    "noise" adds Gaussian noise of NOISE_SCALE times the inputs' standard deviation. The
    teacher runs on exactly the view the student sees, so the transfer set grows with
    inputs that labels alone could not supervise.
    """

    def __init__(self, kind: str, teacher: nn.Module, input_std: float) -> None:
        self.kind, self.teacher, self.input_std = kind, teacher, input_std
        self._beta = torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA)

    def views(self, inputs: Tensor) -> Tensor:
        if self.kind == "mixup":
            shape = (int(inputs.shape[0]),) + (1,) * (inputs.dim() - 1)
            weight = self._beta.sample(shape).to(device=inputs.device, dtype=inputs.dtype)
            partner = inputs[torch.randperm(int(inputs.shape[0])).to(inputs.device)]
            return weight * inputs + (1 - weight) * partner
        return inputs + torch.randn_like(inputs) * (NOISE_SCALE * self.input_std)

    def teacher_logits(self, views: Tensor) -> Tensor:
        if module_device(self.teacher) != views.device:
            self.teacher.to(views.device)
        with torch.no_grad():
            return logits_of(self.teacher(views)).float()


class FeatureMatcher:
    """Forward hooks on paired teacher/student modules and the MSE between their outputs."""

    def __init__(self, teacher: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], adapters: nn.ModuleList) -> None:
        self.teacher, self.adapters = teacher, adapters
        self.teacher_outputs: list[Tensor | None] = [None] * len(pairs)
        self.student_outputs: list[Tensor | None] = [None] * len(pairs)
        self.handles: list[RemovableHandle] = []
        for index, (teacher_module, student_module) in enumerate(pairs):
            self.handles.append(teacher_module.register_forward_hook(self._store(self.teacher_outputs, index)))
            self.handles.append(student_module.register_forward_hook(self._store(self.student_outputs, index)))

    @staticmethod
    def _store(outputs: list[Tensor | None], index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[index] = logits_of(output)

        return hook

    def run_teacher(self, inputs: Tensor) -> None:
        if module_device(self.teacher) != inputs.device:
            self.teacher.to(inputs.device)
        with torch.no_grad():
            self._teacher_logits = logits_of(self.teacher(inputs)).float()

    def teacher_logits(self) -> Tensor:
        """The teacher's logits from the last run_teacher."""
        return self._teacher_logits

    def loss(self) -> Tensor:
        terms = []
        for adapter, teacher_out, student_out in zip(self.adapters, self.teacher_outputs, self.student_outputs):
            assert teacher_out is not None and student_out is not None
            terms.append(F.mse_loss(adapter(student_out.float()), teacher_out.detach().float()))
        return torch.stack(terms).mean()

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def predict_logits(
    model: nn.Module, inputs: Batch, device: torch.device | str = "cpu", batch_size: int = _PREDICT_BATCH
) -> Tensor:
    """The model's logits for every input, computed in batches under no_grad, on the CPU.

    Example:
        >>> predict_logits(teacher, data.inputs).shape
        torch.Size([1257, 10])
    """
    target = torch.device(device)
    original = module_device(model)
    if original != target:
        model.to(target)
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, int(inputs.shape[0]), batch_size):
                outputs.append(logits_of(model(inputs[start : start + batch_size].to(target))).float().cpu())
    finally:
        if original != target:
            model.to(original)
    return torch.cat(outputs)
