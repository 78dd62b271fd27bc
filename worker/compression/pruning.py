"""Pruning stage (method `prune`): zeros that make the artifact smaller, channels that go away.

Schemes:
- `l1_unstructured`, `random_unstructured`: per layer, the round(amount * n) weights of
  smallest |w| (or random ones) become zero, the rule of torch.nn.utils.prune. The
  mask is computed here and baked straight into the weight, because prune's
  reparametrisation (weight_orig, weight_mask, a forward pre-hook) cannot be put
  on TorchScript modules and leaves nothing behind anyway once removed.
- `global_l1_unstructured`: one magnitude threshold across all chosen layers.
- `nm_semi_structured`: in every group of M consecutive input weights of each output
  row, the N largest |w| stay. On CUDA, 2:4 fp16/bf16 Linear weights become
  torch's semi-structured sparse tensors where torch accepts their shape.
- `ln_structured`: whole output channels / neurons go by their Ln norm, physically,
  with torch-pruning's dependency graph (so the next layer's inputs, batch norms
  and flattened features follow). Exported-program graphs are first "lifted":
  their aten conv / linear / batch_norm / layer_norm calls become calls of real
  nn modules that hold the same parameters, which torch-pruning can trace.

With `schedule`, pruning is gradual (Zhu & Gupta 2017, cubic schedule) with
fine-tuning between steps; with only `train`, one fine-tuning run follows
one-shot pruning. Masks stay fixed during fine-tuning.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from worker.compression.base import Dataset, EngineError, ModelKind, StageContext, StageResult, select_layers
from worker.compression.inputs import Batch, ModelInputs, batch_of, call_model, select_output
from worker.compression.training import fit

UNSTRUCTURED = ("l1_unstructured", "random_unstructured", "global_l1_unstructured")
SCHEMES = UNSTRUCTURED + ("nm_semi_structured", "ln_structured")

_aten = torch.ops.aten
_CONV_OPS = {_aten.conv1d.default: nn.Conv1d, _aten.conv2d.default: nn.Conv2d, _aten.conv3d.default: nn.Conv3d,
             _aten.conv1d.padding: nn.Conv1d, _aten.conv2d.padding: nn.Conv2d, _aten.conv3d.padding: nn.Conv3d}
_BATCH_NORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_RESHAPE_OPS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)

Layer = tuple[str, nn.Module]


def run_stage(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> StageResult:
    """Prune `model` by `scheme` and return it with masks baked into plain weights.

    Args:
        model: an eager module, a TorchScript module or an exported program's graph module (ctx.kind).
        scheme: one of SCHEMES.
        options: the validated stage options of modelpress.catalog (amount, layers, prune_classifier,
            schedule, train, norm, n, m).
        ctx: example input, datasets, progress and cancellation.
    Returns:
        StageResult whose info holds a per-layer table ("layers"), "macs_before" / "macs_after"
        and the scheme's figures; unstructured and N:M results prefer the sparse_state_dict format.
    Example:
        >>> run_stage(model, "l1_unstructured", {"amount": 0.8, "layers": None, "prune_classifier": False,
        ...           "schedule": None, "train": None}, ctx).info["sparsity"]
        0.8
    """
    if scheme not in SCHEMES:
        raise EngineError(f"unknown pruning scheme {scheme!r}; known schemes: {list(SCHEMES)}")
    kind = ctx.kind
    macs_before = count_macs(model, kind, ctx.example_input)
    shapes_before = {name: list(_weight(module).shape) for name, module in _matrix_layers(model)}
    if scheme == "ln_structured":
        model, info = _prune_channels(model, options, ctx)
        preferred = None
    else:
        info = _prune_weights(model, scheme, options, ctx)
        preferred = "sparse_state_dict"
    macs_after = count_macs(model, kind, ctx.example_input)
    targeted = set(info.pop("targeted"))
    info["layers"] = _layer_table(model, shapes_before, targeted)
    emptied = [row["layer"] for row in info["layers"] if row["sparsity"] == 1.0 and row["layer"] in targeted]
    if emptied:
        # Global thresholds can take all of a layer whose weights are small everywhere.
        info["warnings"] = [f"layer {name} has no nonzero weights left; its output no longer depends on "
                            f"its input" for name in emptied]
    info.update(macs_before=macs_before["macs"], macs_after=macs_after["macs"],
                macs_counter=macs_after["counter"], macs_input_shape=macs_after["input_shape"])
    ctx.progress(1.0, "pruned")
    return StageResult(model=model, kind=kind, info=info, preferred_output_format=preferred)


# ---------------------------------------------------------------- masks


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after `step` of `steps` on the cubic schedule of Zhu & Gupta (2017).

    s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3, so early steps prune fast and late ones gently.

    Example:
        >>> [round(cubic_sparsity(t, 2, 0.8), 3) for t in (0, 1, 2)]
        [0.0, 0.7, 0.8]
    """
    return final + (initial - final) * (1.0 - step / steps) ** 3


def magnitude_masks(weights: Sequence[Tensor], amount: float, *, global_scope: bool = False,
                    random: bool = False, previous: Sequence[Tensor] | None = None,
                    generator: torch.Generator | None = None) -> list[Tensor]:
    """Boolean keep-masks that zero round(amount * n) weights of smallest |w| (or random ones).

    Args:
        weights: the weights to prune.
        amount: fraction of weights to zero, per weight or (global_scope) over all of them.
        global_scope: one threshold across all weights instead of one per weight.
        random: pick the weights at random instead of by magnitude.
        previous: masks already held; their zeros are pruned first, so masks only grow.
        generator: random source for `random`.
    Returns:
        One bool tensor per weight, True where the weight stays.
    Example:
        >>> magnitude_masks([torch.tensor([[1.0, -3.0], [0.5, 2.0]])], 0.5)[0]
        tensor([[False,  True],
                [False,  True]])
    """
    scores = []
    for index, weight in enumerate(weights):
        if random:
            score = torch.rand(weight.shape, generator=generator).to(weight.device)
        else:
            score = weight.detach().abs().float()
        if previous is not None:
            score = score.masked_fill(~previous[index].to(weight.device), -1.0)
        scores.append(score)
    if global_scope:
        flat = torch.cat([s.reshape(-1).cpu() for s in scores])
        keep = _keep_largest(flat, round(amount * flat.numel()))
        masks, offset = [], 0
        for weight in weights:
            masks.append(keep[offset:offset + weight.numel()].reshape(weight.shape).to(weight.device))
            offset += weight.numel()
        return masks
    return [_keep_largest(score, round(amount * score.numel())) for score in scores]


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the n largest |w| of every m consecutive inputs of each output row.

    Inputs are dims 1.. flattened (in_channels x kernel for a conv).

    Example:
        >>> nm_mask(torch.tensor([[4.0, -1.0, 3.0, 0.5]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"{rows.shape[1]} inputs per output are not a multiple of {m}")
    groups = rows.abs().reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def _keep_largest(scores: Tensor, prune_count: int) -> Tensor:
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if prune_count > 0:
        drop = torch.topk(scores.reshape(-1), prune_count, largest=False).indices
        keep.view(-1)[drop] = False
    return keep


def _apply_masks(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for weight, mask in zip(weights, masks):
            weight.masked_fill_(~mask.to(weight.device), 0.0)


def _mask_keeper(weights: Sequence[Tensor], masks: Sequence[Tensor]) -> Callable[[], None]:
    """after_step for the training loop: re-zero pruned weights after every optimizer step."""
    held = list(masks)

    def reapply() -> None:
        with torch.no_grad():
            for index, weight in enumerate(weights):
                if held[index].device != weight.device:
                    held[index] = held[index].to(weight.device)
                weight.masked_fill_(~held[index], 0.0)

    return reapply


# ---------------------------------------------------------------- unstructured and N:M


def _prune_weights(model: nn.Module, scheme: str, options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    layers = _chosen_layers(model, options)
    info: dict[str, Any] = {"scheme": scheme}
    if scheme == "nm_semi_structured":
        n, m = int(options.get("n", 2)), int(options.get("m", 4))
        fitting = [(name, module) for name, module in layers if _weight(module)[0].numel() % m == 0]
        skipped = [name for name, module in layers if _weight(module)[0].numel() % m]
        if not fitting:
            raise EngineError(f"no chosen layer has a number of inputs divisible by m={m} "
                              f"({', '.join(skipped)}); choose other layers or another m")
        weights = [_weight(module) for _, module in fitting]
        masks = [nm_mask(weight, n, m) for weight in weights]
        _apply_masks(weights, masks)
        info.update(n=n, m=m, skipped_layers=skipped)
        info.update(_finetune_once(model, weights, masks, options, ctx))
        info["semi_structured_layers"] = _to_semi_structured_on_cuda(fitting, ctx) if (n, m) == (2, 4) else []
        layers = fitting
    else:
        amount = float(options.get("amount", 0.5))
        weights = [_weight(module) for _, module in layers]
        schedule = options.get("schedule")
        if schedule:
            info["schedule"] = _gradual_unstructured(model, scheme, weights, amount, schedule, options, ctx)
        else:
            masks = _unstructured_masks(scheme, weights, amount, None, ctx.seed)
            _apply_masks(weights, masks)
            info.update(_finetune_once(model, weights, masks, options, ctx))
        info["amount"] = amount
    zeros = sum(int((_weight(module) == 0).sum()) for _, module in layers)
    total = sum(_weight(module).numel() for _, module in layers)
    info["sparsity"] = round(zeros / total, 6)
    info["targeted"] = [name for name, _ in layers]
    return info


def _unstructured_masks(scheme: str, weights: Sequence[Tensor], amount: float,
                        previous: Sequence[Tensor] | None, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed) if scheme == "random_unstructured" else None
    return magnitude_masks(weights, amount, global_scope=scheme == "global_l1_unstructured",
                           random=scheme == "random_unstructured", previous=previous, generator=generator)


def _gradual_unstructured(model: nn.Module, scheme: str, weights: Sequence[Tensor], amount: float,
                          schedule: dict[str, Any], options: dict[str, Any], ctx: StageContext) -> list[dict[str, Any]]:
    steps, epochs = _schedule_lengths(schedule)
    data = _labelled_train_data(ctx, "gradual pruning")
    masks: list[Tensor] | None = None
    history = []
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        target = cubic_sparsity(step, steps, amount)
        ctx.progress((step - 1) / steps, f"step {step}/{steps}: pruning to {target:.3f}")
        masks = _unstructured_masks(scheme, weights, target, masks, ctx.seed + step)
        _apply_masks(weights, masks)
        record: dict[str, Any] = {"step": step, "target_sparsity": round(target, 6)}
        if epochs:
            summary = _fit(model, data, options, epochs, ctx, (step - 1) / steps, 1 / steps,
                           after_step=_mask_keeper(weights, masks))
            record.update(_fit_figures(summary))
        history.append(record)
    return history


def _finetune_once(model: nn.Module, weights: Sequence[Tensor], masks: Sequence[Tensor],
                   options: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """One fine-tuning run with masks held, when the stage has `train` options and no schedule."""
    if not options.get("train"):
        return {}
    data = _labelled_train_data(ctx, "fine-tuning (train options)")
    summary = _fit(model, data, options, None, ctx, 0.0, 1.0, after_step=_mask_keeper(weights, masks))
    return {"finetune": _fit_figures(summary)}


def _to_semi_structured_on_cuda(layers: Sequence[Layer], ctx: StageContext) -> list[str]:
    """Swap 2:4 fp16/bf16 Linear weights on CUDA for torch's semi-structured sparse tensors.

    The speed-up is real only there (cuSPARSELt / CUTLASS kernels); layers whose shape
    or dtype torch refuses stay dense. The artifact stores their dense values.
    """
    if ctx.device.type != "cuda" or not torch.cuda.is_available():
        return []
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in layers:
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if weight is None or not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        converted.append(name)
    return converted


# ---------------------------------------------------------------- structured


def _prune_channels(model: nn.Module, options: dict[str, Any], ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    import torch_pruning as tp

    if ctx.kind == "torchscript":
        raise EngineError("ln_structured removes channels and so changes the model's code, which a TorchScript "
                          "file does not expose; upload a state_dict with a registered architecture or an "
                          "exported program (torch.export) instead")
    if options.get("prune_classifier"):
        raise EngineError("ln_structured removes whole output neurons; on the final classifier that would remove "
                          "classes. Set prune_classifier to false")
    example = ctx.example_input.to(_device_of(model))
    batches = [example]
    if example.dim() >= 1:
        batches.append(example[:1] if len(example) > 1 else batch_of(example, 2))
    if ctx.kind == "graph":
        with torch.no_grad():
            expected = _first_tensor(call_model(model, example))
        # The graph's ops carry the mode it was exported in (training batch norm is refused).
        model = lift_exported_graph(model).eval()
        with torch.no_grad():
            lifted = _first_tensor(call_model(model, example))
        if lifted.shape != expected.shape or not torch.allclose(lifted, expected, rtol=1e-4, atol=1e-5):
            raise EngineError("the exported program could not be rebuilt from nn modules faithfully, so its "
                              "channels cannot be removed; upload a state_dict with a registered architecture")
    layers = _chosen_layers(model, options)
    targeted = {id(module) for _, module in layers}
    ignored = [module for _, module in _matrix_layers(model) if id(module) not in targeted]
    amount = float(options.get("amount", 0.5))
    norm = float(options.get("norm") or 2.0)
    schedule = options.get("schedule")
    steps, epochs = _schedule_lengths(schedule) if schedule else (1, 0)
    if schedule and epochs:
        data: Dataset | None = _labelled_train_data(ctx, "gradual pruning")
    elif not schedule and options.get("train"):
        data = _labelled_train_data(ctx, "fine-tuning (train options)")
    else:
        data = None
    # Batch sizes the model ran on before must still work after (a graph may allow only some).
    reference_shapes = _output_shapes(model, batches)
    was_training = model.training
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, forward_fn=call_model, output_transform=_first_tensor,
            importance=tp.importance.MagnitudeImportance(p=norm), pruning_ratio=amount,
            ignored_layers=ignored, iterative_steps=steps,
            iterative_pruning_ratio_scheduler=lambda ratio, n: [cubic_sparsity(t, n, ratio) for t in range(n + 1)])
    except Exception as error:
        raise EngineError(f"torch-pruning could not trace the model's channel dependencies: "
                          f"{_last_line(error)}") from error
    history = []
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        target = cubic_sparsity(step, steps, amount)
        ctx.progress((step - 1) / steps, f"step {step}/{steps}: removing {target:.0%} of channels")
        try:
            pruner.step()
        except Exception as error:
            raise EngineError(f"torch-pruning failed to remove channels: {_last_line(error)}") from error
        record: dict[str, Any] = {"step": step, "target_channel_ratio": round(target, 6)}
        if schedule and data is not None:
            record.update(_fit_figures(_fit(model, data, options, epochs, ctx, (step - 1) / steps, 1 / steps)))
        history.append(record)
    model.train(was_training)
    _check_still_runs(model, batches, reference_shapes)
    info: dict[str, Any] = {"scheme": "ln_structured", "amount": amount, "norm": norm,
                            "amount_means": "fraction of output channels removed from each targeted layer",
                            "targeted": [name for name, _ in layers]}
    if schedule:
        info["schedule"] = history
    elif data is not None:
        info["finetune"] = _fit_figures(_fit(model, data, options, None, ctx, 0.0, 1.0))
    return model, info


def lift_exported_graph(graph_module: fx.GraphModule) -> fx.GraphModule:
    """An equivalent graph module whose conv / linear / norm ops are calls of real nn modules.

    An exported program's module keeps parameters on plain container modules and calls
    aten ops on them, which torch-pruning cannot trace. This swaps each container for the
    nn module the op stands for (sharing the same parameter tensors) and turns the op
    into a call of it. Reshapes that flatten all but the batch dimension become
    `flatten(1)`, so they keep working when channels go away.

    Raises EngineError when a parameter is used by an op it cannot lift, since pruning
    around it would leave shapes that no longer fit.

    Example:
        >>> lifted = lift_exported_graph(torch.export.export(model, (x,)).module())
    """
    graph = graph_module.graph
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _RESHAPE_OPS and _flattens_to_batch(node):
            node.target, node.args, node.kwargs = _aten.flatten.using_ints, (node.args[0], 1), {}
            continue
        lifted = _module_for(graph_module, node, uses)
        if lifted is None:
            continue
        owner, module = lifted
        _set_submodule(graph_module, owner, module)
        with graph.inserting_before(node):
            call = graph.call_module(owner, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    leftovers = sorted({f"{user.target} uses {node.target}" for node in graph.nodes if node.op == "get_attr"
                        and isinstance(_attr(graph_module, node.target), nn.Parameter) for user in node.users})
    if leftovers:
        raise EngineError("ln_structured on an exported program handles parameters of conv, linear, batch_norm "
                          f"and layer_norm ops only; this graph also has {', '.join(leftovers[:3])}. Upload a "
                          "state_dict with a registered architecture instead")
    # A fresh GraphModule: the exported one refuses train()/eval(), which torch-pruning calls.
    return fx.GraphModule(graph_module, graph)


def _module_for(root: fx.GraphModule, node: fx.Node, uses: dict[str, int]) -> tuple[str, nn.Module] | None:
    """(owner path, nn module) equivalent to `node`, or None when it is not a liftable op."""
    target = node.target
    args = list(node.args) + [None] * 9
    kwargs = dict(node.kwargs)
    if target is _aten.linear.default:
        tensors = {"weight": args[1], "bias": args[2] if args[2] is not None else kwargs.get("bias")}
    elif target in _CONV_OPS:
        tensors = {"weight": args[1], "bias": args[2] if args[2] is not None else kwargs.get("bias")}
    elif target is _aten.batch_norm.default:
        tensors = {"weight": args[1], "bias": args[2], "running_mean": args[3], "running_var": args[4]}
    elif target is _aten.layer_norm.default:
        tensors = {"weight": args[2], "bias": args[3]}
    else:
        return None
    owner = _common_owner(root, tensors, uses)
    if owner is None:
        return None
    values = {name: _attr(root, arg.target) for name, arg in tensors.items() if arg is not None}
    weight = values["weight"]
    module: nn.Module
    if target is _aten.linear.default:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in values, device="meta")
    elif target in _CONV_OPS:
        names = ("stride", "padding", "dilation", "groups")
        conv_args = {k: kwargs.get(k, v) for k, v in zip(names, args[3:7]) if kwargs.get(k, v) is not None}
        groups = int(conv_args.pop("groups", 1))
        conv_args = {k: v if isinstance(v, str) else tuple(v) for k, v in conv_args.items()}
        module = _CONV_OPS[target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                   groups=groups, bias="bias" in values, device="meta", **conv_args)
    elif target is _aten.batch_norm.default:
        if args[5]:
            raise EngineError("the exported program's batch norm runs in training mode; call model.eval() "
                              "before torch.export.export and upload it again")
        rank = _rank(node.args[0])
        if rank not in _BATCH_NORM_BY_RANK or "running_mean" not in values:
            return None
        module = _BATCH_NORM_BY_RANK[rank](weight.shape[0], eps=float(args[7]), momentum=float(args[6]),
                                           device="meta")
        tracked = getattr(root.get_submodule(owner), "num_batches_tracked", None)
        if isinstance(tracked, Tensor):
            module.num_batches_tracked = tracked
    else:
        module = nn.LayerNorm(list(args[1]), eps=float(args[4] if args[4] is not None else 1e-5),
                              bias="bias" in values, device="meta")
    for name, value in values.items():
        setattr(module, name, value)
    module.train(False)
    return owner, module


def _common_owner(root: fx.GraphModule, tensors: dict[str, Any], uses: dict[str, int]) -> str | None:
    """The container that owns exactly these tensors, each used by this one op; else None."""
    owners = set()
    for name, arg in tensors.items():
        if arg is None:
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr" or uses.get(arg.target, 0) != 1:
            return None
        owner, _, attribute = arg.target.rpartition(".")
        if attribute != name or not owner:
            return None
        owners.add(owner)
    if len(owners) != 1 or tensors.get("weight") is None:
        return None
    owner = owners.pop()
    container = root.get_submodule(owner)
    # Only plain containers holding nothing but these tensors are swapped for a real module.
    held = set(container._parameters) | set(container._buffers)
    if (type(container) is not nn.Module or any(True for _ in container.children())
            or not held <= set(tensors) | {"num_batches_tracked"}):
        return None
    return owner


def _flattens_to_batch(node: fx.Node) -> bool:
    """True when a view/reshape turns (batch, ...) into (batch, everything else)."""
    source = node.args[0]
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    after = node.meta.get("val")
    if not isinstance(before, Tensor) or not isinstance(after, Tensor) or after.dim() != 2 or before.dim() <= 2:
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(before.shape[0] == after.shape[0]))
    except Exception:
        return False


def _rank(node: Any) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, Tensor) else None


def _attr(root: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _first_tensor(output: Any) -> Tensor:
    return select_output(output)


def _output_shapes(model: nn.Module, batches: Sequence[Batch]) -> list[list[int] | None]:
    shapes: list[list[int] | None] = []
    for batch in batches:
        try:
            with torch.no_grad():
                shapes.append(list(_first_tensor(call_model(model, batch)).shape))
        except Exception:
            shapes.append(None)
    return shapes


def _check_still_runs(model: nn.Module, batches: Sequence[Batch], reference: Sequence[list[int] | None]) -> None:
    """The pruned model must give outputs of the same shapes on the inputs the original ran on."""
    for batch, expected in zip(batches, reference):
        if expected is None:
            continue
        try:
            with torch.no_grad():
                shape = list(_first_tensor(call_model(model, batch)).shape)
        except Exception as error:
            raise EngineError(f"after removing channels the model no longer runs on inputs of shape "
                              f"{list(batch.shape)}: {_last_line(error)}. It may hard-code channel counts "
                              f"(reshape to fixed sizes); exclude those layers with layers.exclude") from error
        if shape != expected:
            raise EngineError(f"after removing channels the model's output has shape {shape} instead of "
                              f"{expected}; exclude the output layers with layers.exclude")


# ---------------------------------------------------------------- training glue


def _schedule_lengths(schedule: dict[str, Any]) -> tuple[int, int]:
    steps, epochs = schedule.get("steps", 1), schedule.get("finetune_epochs", 1)
    if not isinstance(steps, int) or steps < 1 or not isinstance(epochs, int) or epochs < 0:
        raise EngineError("schedule needs integer steps >= 1 and finetune_epochs >= 0")
    return steps, epochs


def _labelled_train_data(ctx: StageContext, purpose: str) -> Dataset:
    data = ctx.train_data
    if data is None or data.labels is None:
        raise EngineError(f"{purpose} fine-tunes the model, so the job needs a dataset_id with labels")
    return data


def _fit(model: nn.Module, data: Dataset, options: dict[str, Any], epochs: int | None, ctx: StageContext,
         start: float, span: float, after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    train_options = dict(options.get("train") or {})
    if epochs is not None:
        train_options["epochs"] = epochs

    def progress(fraction: float, message: str) -> None:
        ctx.progress(start + span * fraction, message)

    summary: dict[str, Any] = fit(model, data, train_options, dataclasses.replace(ctx, progress=progress),
                                  after_step=after_step, val_data=ctx.eval_data)
    return summary


def _fit_figures(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("epochs_run", "final_loss", "last_val_accuracy", "best_val_accuracy")
    return {key: summary.get(key) for key in keys}


# ---------------------------------------------------------------- figures


def count_macs(model: nn.Module, kind: ModelKind, example_input: Batch) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass on one sample (or the whole example if it must).

    Eager modules are counted by torch-pruning (Conv, Linear, norms; bias adds included);
    TorchScript and graph modules, which it cannot hook, by torch.utils.flop_counter
    (matmul and convolution only, FLOPs / 2). Dense counts: zeros of unstructured
    pruning are still multiplied by dense kernels. {"macs": None, ...} when neither runs.
    """
    candidates = [example_input[:1], example_input] if example_input.dim() and len(example_input) > 1 \
        else [example_input]
    counters: list[tuple[str, Callable[[Batch], int]]] = []
    if kind == "eager":
        counters.append(("torch_pruning.utils.count_ops_and_params", lambda x: _tp_macs(model, x)))
    counters.append(("torch.utils.flop_counter (flops / 2)", lambda x: _flop_counter_macs(model, x)))
    for name, counter in counters:
        for example in candidates:
            try:
                return {"macs": counter(example.to(_device_of(model))), "counter": name,
                        "input_shape": list(example.shape)}
            except Exception:
                continue
    return {"macs": None, "counter": None, "input_shape": None}


def _tp_macs(model: nn.Module, example: Batch) -> int:
    import torch_pruning as tp

    if isinstance(example, ModelInputs):
        raise EngineError("torch-pruning's counter takes one input tensor")  # the flop counter takes over
    was_training = model.training
    try:
        macs, _ = tp.utils.count_ops_and_params(model, example)
    finally:
        model.train(was_training)
    return int(macs)


def _flop_counter_macs(model: nn.Module, example: Batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, example)
    return int(counter.get_total_flops()) // 2


def _layer_table(model: nn.Module, shapes_before: dict[str, list[int]], targeted: set[str]) -> list[dict[str, Any]]:
    rows = []
    for name, module in _matrix_layers(model):
        weight = _weight(module)
        rows.append({"layer": name, "shape_before": shapes_before.get(name), "shape_after": list(weight.shape),
                     "sparsity": round(float((weight == 0).sum()) / max(1, weight.numel()), 6),
                     "targeted": name in targeted})
    return rows


# ---------------------------------------------------------------- helpers


def _chosen_layers(model: nn.Module, options: dict[str, Any]) -> list[Layer]:
    layers = select_layers(model, options.get("layers"), include_classifier=bool(options.get("prune_classifier")))
    if not layers:
        names = [name for name, _ in _matrix_layers(model)]
        raise EngineError(f"the layer patterns {options.get('layers')} match no prunable layer; layers with "
                          f"weights are {names[:20]} (the last is the classifier, left alone unless "
                          f"prune_classifier is true)")
    return layers


def _matrix_layers(model: nn.Module) -> list[Layer]:
    return select_layers(model, None, include_classifier=True)


def _weight(module: nn.Module) -> Tensor:
    weight: Tensor = module.weight
    return weight


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
