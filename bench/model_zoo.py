"""A model zoo of the architectures users upload, in tiny seeded configs with random weights.

Nothing is downloaded: every model is built from its config and initialised from a fixed
seed, so tests get the same weights on every run. The Hugging Face models (BERT, GPT-2) are
the real `transformers` classes, because their quirks are what users hit: non-persistent
`position_ids` buffers, tuple / dict outputs, a GPT-2 LM head tied to the token embedding.
The vision models are small hand-written equivalents of torchvision's ResNet and
MobileNetV3 and of timm's ViT (same building blocks: residual BasicBlocks with batch norm,
depthwise inverted residuals with squeeze-excite and hardswish, patch embedding + class
token + pre-norm attention blocks); torchvision's CPU wheel needs its C++ ops registered by
hand on this torch, and timm would pull it in.

Each entry says how to call the model: `inputs` (positional tensors), `constants` (extra
non-tensor arguments) and `float_input` (whether one float tensor is all it takes, the
shape the current engine feeds).

Example:
    >>> entry = build("resnet"); entry.model(*entry.inputs).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEED = 0
VOCAB = 100
SEQUENCE = 12


@dataclass
class ZooEntry:
    name: str
    model: nn.Module
    inputs: tuple[Tensor, ...]
    constants: tuple[Any, ...] = ()
    float_input: bool = True
    notes: dict[str, Any] = field(default_factory=dict)

    def scripted(self) -> torch.jit.ScriptModule:
        """The model as a TorchScript upload: traced with its example inputs (scripted when it has constants)."""
        if self.constants:
            return torch.jit.script(self.model)
        with torch.no_grad():
            return torch.jit.trace(self.model, self.inputs, check_trace=False, strict=False)

    def save_torchscript(self, path: Path) -> Path:
        torch.jit.save(self.scripted(), str(path))
        return path

    def save_as(self, model_format: str, folder: Path) -> Path:
        """The upload file of one format: "torchscript", "exported_program" or "huggingface"."""
        if model_format == "huggingface":
            return self.save_pretrained_zip(folder)
        if model_format == "exported_program":
            return self.save_exported(folder / f"{self.name}.pt2")
        return self.save_torchscript(folder / f"{self.name}.pt")

    def save_pretrained_zip(self, folder: Path) -> Path:
        """A Hugging Face model as users upload it: its `save_pretrained` folder, zipped."""
        saved = folder / f"{self.name}-saved"
        self.model.save_pretrained(str(saved))
        archive = folder / f"{self.name}.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            for file in sorted(saved.iterdir()):
                handle.write(file, f"{self.name}/{file.name}")
        return archive

    def save_exported(self, path: Path) -> Path:
        batch = torch.export.Dim("batch", min=1, max=1024)
        shapes = tuple({0: batch} for _ in self.inputs)
        inputs = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in self.inputs)
        program = torch.export.export(
            self.model, inputs + self.constants, dynamic_shapes=shapes + tuple(None for _ in self.constants)
        )
        with open(path, "wb") as handle:
            torch.export.save(program, handle)
        return path


# ---------------------------------------------------------------- vision


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with batch norm and a (projected) shortcut."""

    def __init__(self, fan_in: int, fan_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(fan_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or fan_in != fan_out:
            self.downsample = nn.Sequential(nn.Conv2d(fan_in, fan_out, 1, stride, bias=False), nn.BatchNorm2d(fan_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, fan_in = [], widths[0]
        for index, width in enumerate(widths):
            blocks.append(BasicBlock(fan_in, width, 1 if index == 0 else 2))
            fan_in = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(fan_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project."""

    def __init__(self, fan_in: int, expanded: int, fan_out: int, stride: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(
            nn.Conv2d(fan_in, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            nn.Hardswish(),
        )
        self.se = SqueezeExcite(expanded, max(8, expanded // 4))
        self.project = nn.Sequential(nn.Conv2d(expanded, fan_out, 1, bias=False), nn.BatchNorm2d(fan_out))
        self.residual = stride == 1 and fan_in == fan_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class TinyMobileNetV3(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 1), InvertedResidual(16, 48, 24, 2), InvertedResidual(24, 64, 24, 1)
        )
        self.head = nn.Sequential(nn.Linear(24, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's VisionTransformer layout: conv patch embedding, class token, learned positions, pre-norm blocks."""

    def __init__(
        self, image: int = 32, patch: int = 8, dim: int = 48, depth: int = 2, heads: int = 3, classes: int = 10
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# ---------------------------------------------------------------- sequence


class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> LSTM -> last hidden state -> classes; the LSTM holds most weights."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids: Tensor) -> Tensor:
        _, (hidden, _) = self.lstm(self.embedding(ids))
        return self.fc(hidden[-1])


class AudioModel(nn.Module):
    """A scripted audio model that takes the sample rate as a plain int: forward(x, sr)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 16, 9, stride=4)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor, sr: int) -> Tensor:
        scale = 16000.0 / float(sr)
        features = F.relu(self.conv(x.unsqueeze(1) * scale))
        return self.fc(features.mean(-1))


def _bert() -> ZooEntry:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        torchscript=True,
    )
    ids = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(SEED))
    mask = torch.ones_like(ids)
    return ZooEntry("bert", BertModel(config).eval(), (ids, mask), float_input=False)


def _gpt2() -> ZooEntry:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        torchscript=True,
        use_cache=False,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2's LM head must be tied"
    ids = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(SEED))
    return ZooEntry(
        "gpt2", model, (ids,), float_input=False, notes={"tied": ("lm_head.weight", "transformer.wte.weight")}
    )


def _image(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))


BUILDERS: dict[str, Callable[[], ZooEntry]] = {
    # so small that a container's fixed overhead outweighs any saving on its 108 weights
    "tiny_mlp": lambda: ZooEntry(
        "tiny_mlp",
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(),
        (torch.randn(2, 8, generator=torch.Generator().manual_seed(SEED)),),
    ),
    "resnet": lambda: ZooEntry("resnet", TinyResNet().eval(), (_image(),)),
    "mobilenet_v3": lambda: ZooEntry("mobilenet_v3", TinyMobileNetV3().eval(), (_image(),)),
    "vit": lambda: ZooEntry("vit", TinyViT().eval(), (_image(),)),
    "bert": _bert,
    "gpt2": _gpt2,
    "lstm": lambda: ZooEntry(
        "lstm",
        LSTMClassifier().eval(),
        (torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(SEED)),),
        float_input=False,
    ),
    "audio": lambda: ZooEntry(
        "audio",
        AudioModel().eval(),
        (torch.randn(2, 800, generator=torch.Generator().manual_seed(SEED)),),
        constants=(16000,),
        float_input=False,
    ),
}
NAMES = tuple(BUILDERS)


def build(name: str) -> ZooEntry:
    """A fresh, seeded instance of the zoo model `name` (one of NAMES)."""
    torch.manual_seed(SEED)
    return BUILDERS[name]()


def torchscript_bytes(entry: ZooEntry) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(entry.scripted(), buffer)
    return buffer.getvalue()


def readme_loader() -> dict[str, Any]:
    """The README's artifact-loading code block, executed: its names (decode_sparse_state_dict, ...).

    Tests load artifacts with this, so the README's instructions are what is tested. The
    block's lines that need a real artifact file or the user's model are skipped;
    `sparse_one_liner(state)` is the block's one-line conversion for sparse_state_dict files.
    """
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Loading an artifact")
    block = readme[readme.index("```python", start) + len("```python") :]
    block = block[: block.index("```")]
    namespace: dict[str, Any] = {"state": {}}  # the sparse one-liner's input, as a real file would give
    runnable = "\n".join(line for line in block.splitlines() if "artifact.pt" not in line and "my_model" not in line)
    exec(compile(runnable, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    one_liner = next(line for line in block.splitlines() if line.startswith("state = {"))
    expression = one_liner.split("=", 1)[1].strip()
    namespace["sparse_one_liner"] = lambda state: eval(expression, {"torch": torch, "state": state})  # noqa: S307
    return namespace
