"""Models: torchvision's ResNet-18 (optionally with the CIFAR stem), a small CNN, a linear model,
and the LSTM text classifier of "Attack of the Tails"."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["SmallCNN", "TextLSTM", "build_model", "get_device", "imagenet_resnet18"]


class SmallCNN(nn.Module):
    """Two conv blocks + two dense layers, fast on CPU.

    Input ``(B, C, H, W)`` with H, W divisible by 4 (28 or 32); output logits
    ``(B, num_classes)``. No BatchNorm, so every state entry is a trainable weight.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a normalised image batch."""
        return self.classifier(self.features(x))


class TextLSTM(nn.Module):
    """Embedding, 2-layer LSTM, dropout and a linear layer on the last time step.

    The text model of "Attack of the Tails" (Wang et al. 2020, ``TextBinaryClassificationModel``;
    embedding and hidden size 200, 2 layers, dropout 0.5 between the LSTM layers and
    before the output layer, padding id 0, zero initial state). It ends in
    ``num_classes`` logits for cross-entropy where that model has one sigmoid output
    for binary cross-entropy. Input int64 ``(B, L)`` token ids, left-padded; output
    logits ``(B, num_classes)``. No BatchNorm: every state entry is a trainable weight.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int = 2,
        embedding_dim: int = 200,
        hidden_dim: int = 200,
        num_layers: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of token ids."""
        outputs, _ = self.lstm(self.embedding(x))
        return self.fc(self.dropout(outputs[:, -1]))


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    num_features: int = 0,
    pretrained_weights: bool = True,
    vocab_size: int = 0,
    embedding_dim: int = 200,
    hidden_dim: int = 200,
) -> nn.Module:
    """A freshly initialised model (ImageNet-trained for ``"resnet18-imagenet"``).

    ``pretrained_weights=False`` builds ``"resnet18-imagenet"`` without loading the
    weights file: for callers that overwrite every weight anyway (clients, evaluation).

    ``"resnet18"``: ``torchvision.models.resnet18(num_classes=...)`` as is (ImageNet
    stem); ``"resnet18-cifar"``: the same with the usual CIFAR stem (3x3 stride-1
    ``conv1``, no max-pool); ``"cnn"``: :class:`SmallCNN`; ``"linear"``:
    ``nn.Linear(num_features, num_classes)`` (logistic regression);
    ``"resnet18-imagenet"``: :func:`imagenet_resnet18`; ``"lstm"``: :class:`TextLSTM`
    over ``vocab_size`` token ids.
    """
    if name == "resnet18-imagenet":
        if in_channels != 3:
            raise ValueError(f"model 'resnet18-imagenet' needs RGB inputs, got {in_channels} channel(s)")
        return imagenet_resnet18(num_classes, pretrained_weights)
    if name in ("resnet18", "resnet18-cifar"):
        from torchvision.models import resnet18

        model = resnet18(weights=None, num_classes=num_classes)
        if in_channels != 3 or name == "resnet18-cifar":
            stride, kernel = (1, 3) if name == "resnet18-cifar" else (2, 7)
            model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
        if name == "resnet18-cifar":
            model.maxpool = nn.Identity()
        return model
    if name == "cnn":
        return SmallCNN(in_channels, image_size, num_classes)
    if name == "linear":
        if num_features < 1:
            raise ValueError("model 'linear' needs num_features >= 1")
        return nn.Linear(num_features, num_classes)
    if name == "lstm":
        if vocab_size < 2:
            raise ValueError("model 'lstm' needs vocab_size >= 2 (padding and unknown ids)")
        return TextLSTM(vocab_size, num_classes, embedding_dim, hidden_dim)
    raise ValueError(
        "run config 'model' must be one of resnet18, resnet18-cifar, resnet18-imagenet, cnn, linear, lstm; "
        f"got {name!r}"
    )


def imagenet_resnet18(num_classes: int, pretrained_weights: bool = True) -> nn.Module:
    """torchvision's ImageNet-trained ResNet-18 (ImageNet stem) with a fresh ``num_classes`` head.

    What the paper's released code fine-tunes on CIFAR-10. torchvision downloads the
    weights once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``); without
    them and without a network, ``FileNotFoundError`` names the file to provide.
    ``pretrained_weights=False``: the same architecture, randomly initialised.
    """
    from torchvision.models import ResNet18_Weights, resnet18

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        model = resnet18(weights=weights if pretrained_weights else None)
    except OSError as error:  # URLError included: no network
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        raise FileNotFoundError(
            f"model 'resnet18-imagenet' needs torchvision's ImageNet weights at {str(path)!r} "
            f"(from {weights.url}); they are missing and could not be downloaded: {error}"
        ) from None
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def get_device(setting: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU; otherwise the named torch device."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)
