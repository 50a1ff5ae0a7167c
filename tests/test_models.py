"""``resnet18-imagenet``: torchvision's ImageNet weights from torch's hub cache, with a fresh head."""

from urllib.error import URLError

import pytest
import torch
import torch.hub
from torchvision.models import resnet18

from simulation.config import resolve_config
from simulation.models import build_model


def test_imagenet_resnet18_loads_the_cached_weights_and_replaces_the_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(7)
    stand_in = resnet18(num_classes=1000)  # the real file is ImageNet-trained; any 1000-class ResNet-18 fits
    torch.save(stand_in.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    model = build_model("resnet18-imagenet", num_classes=10)
    assert torch.equal(model.conv1.weight, stand_in.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, stand_in.layer4[1].conv2.weight)
    assert model.fc.out_features == 10
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_resnet18_without_weights_or_network_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"resnet18-f37072fd\.pth"):
        build_model("resnet18-imagenet", num_classes=10)


def test_imagenet_resnet18_needs_rgb_images():
    with pytest.raises(ValueError, match="resnet18-imagenet.*fmnist"):
        resolve_config({"task": "fmnist", "model": "resnet18-imagenet"})
    with pytest.raises(ValueError, match="RGB"):
        build_model("resnet18-imagenet", num_classes=10, in_channels=1)


def test_imagenet_resnet18_architecture_alone_needs_no_weights_file(tmp_path, monkeypatch):
    """Clients overwrite every weight, so they build the architecture without the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    model = build_model("resnet18-imagenet", num_classes=10, pretrained_weights=False)
    assert set(model.state_dict()) == set(resnet18(num_classes=10).state_dict())
    assert model.fc.out_features == 10
