"""The one training loop: fine-tuning after pruning, quantization-aware training, distillation.

`fit(model, data, options, ctx)` trains in place and returns a summary. Options
are the job spec's "train" object, validated into a frozen `TrainConfig`.
Learning rates are set per optimizer step by `learning_rate`, a closed-form
schedule, so the recorded history can be checked against the formulas.
`devices > 1` trains data-parallel with DistributedDataParallel in processes
the worker starts itself (gloo on CPU, nccl on CUDA).

Layout: `config` (options and schedule), `evaluation` (accuracy, train/eval mode,
default loss), `loop` (the epoch loop), `distributed` (data-parallel ranks) and
`fitting` (`fit` and the train/validation split). Import from this package.
"""

from worker.compression.training.config import AMP_DTYPES, OPTIMIZERS, SCHEDULES, TrainConfig, learning_rate
from worker.compression.training.evaluation import (
    CrossEntropyLoss,
    evaluate_accuracy,
    logits_of,
    module_device,
    set_training_mode,
)
from worker.compression.training.fitting import fit, split_dataset
from worker.compression.training.loop import CANCEL_CHECK_BATCHES, LossFn

__all__ = [
    "AMP_DTYPES",
    "CANCEL_CHECK_BATCHES",
    "OPTIMIZERS",
    "SCHEDULES",
    "CrossEntropyLoss",
    "LossFn",
    "TrainConfig",
    "evaluate_accuracy",
    "fit",
    "learning_rate",
    "logits_of",
    "module_device",
    "set_training_mode",
    "split_dataset",
]
