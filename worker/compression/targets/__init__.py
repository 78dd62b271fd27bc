"""Deployment targets other than PyTorch: ONNX Runtime and ExecuTorch.

`deploy.finish_for_target` turns the (pruned, distilled or untouched) float model into the
target's artifact, runs the job's quantize stage with the target runtime's own tools, and
measures original and artifact in that runtime. Imported only for jobs whose target runtime is
not torch, so torch-only workers need none of these packages.
"""
