"""Running a model outside the optimizer: accuracy, train/eval mode, the default loss, logits and device."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError
from worker.compression.inputs import Batch, ModelInputs, call_model, select_output


def evaluate_accuracy(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on a labelled dataset, in [0, 1].

    Works for eager, exported-graph and TorchScript modules; runs on the model's device.
    Example:
        >>> evaluate_accuracy(model, Dataset(x, y))
    """
    if data.labels is None:
        raise EngineError("accuracy needs a dataset with labels")
    if len(data) == 0:
        raise EngineError("accuracy needs a non-empty dataset")
    device = module_device(model)
    was_training = bool(getattr(model, "training", False))
    set_training_mode(model, False)
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                inputs = data.inputs[start : start + batch_size].to(device)
                predicted = logits_of(call_model(model, inputs)).argmax(dim=1).cpu()
                correct += int((predicted == data.labels[start : start + batch_size]).sum())
    finally:
        if was_training:
            set_training_mode(model, True)
    return correct / len(data)


def set_training_mode(model: nn.Module, training: bool) -> None:
    """model.train(training), also for exported-graph modules (which refuse train() and eval())."""
    try:
        model.train(training)
    except NotImplementedError:
        graph = getattr(model, "graph", None)
        mode_dependent = ("dropout", "batch_norm")
        if graph is None or not any(op in str(node.target) for node in graph.nodes for op in mode_dependent):
            return  # nothing in the graph behaves differently in training
        try:
            from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        except ImportError:  # without torchao, graphs keep the mode they were exported in
            return
        (move_exported_model_to_train if training else move_exported_model_to_eval)(model)


class CrossEntropyLoss:
    """The default loss: cross-entropy of the model's logits against integer labels."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, inputs: Batch, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise EngineError("the default loss needs labels")
        return F.cross_entropy(logits_of(call_model(model, inputs)), labels, label_smoothing=self.label_smoothing)


def _probe_forward(model: nn.Module, inputs: Batch) -> None:
    """One forward on a batch of the data, so a shape mismatch says so before training starts."""
    set_training_mode(model, False)  # so batch-norm statistics stay as they are
    try:
        with torch.no_grad():
            logits_of(call_model(model, inputs.to(module_device(model))))
    except EngineError:
        raise
    except Exception as error:
        described = (
            inputs.describe()
            if isinstance(inputs, ModelInputs)
            else f"inputs of shape {list(inputs.shape)}, dtype {inputs.dtype}"
        )
        raise EngineError(
            f"the model does not run on a batch of the dataset ({described}): {str(error).strip().splitlines()[-1]}"
        ) from error


def logits_of(output: Any) -> Tensor:
    """The logits of a forward: the tensor itself, or the first floating tensor of a tuple / dict
    (e.g. logits, aux; a Hugging Face model's output)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return select_output(output)


def module_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
