import pytest
import torch

from sat_train.models import build_model


@pytest.mark.parametrize("arch,channels,size", [
    ("tiny-cnn", 3, 16), ("cnn4", 1, 28), ("resnet10", 1, 28), ("resnet18", 3, 32), ("resnet34", 3, 32),
    ("preact-resnet18", 3, 32), ("resnet10", 3, 64), ("wrn-28-1", 1, 28), ("wrn-34-1", 3, 32),
])
def test_shapes_and_backward(arch, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=channels, image_size=size)
    x = torch.rand(2, channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_normalization_is_inside_and_in_state_dict():
    model = build_model("tiny-cnn", 4, 3, 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    sd = model.state_dict()
    assert torch.equal(sd["normalize.mean"].flatten(), torch.full((3,), 0.5))
    x = torch.full((1, 3, 4, 4), 0.75)
    assert torch.allclose(model.normalize(x), torch.ones_like(x))


def test_depths_differ():
    n = {a: sum(p.numel() for p in build_model(a, 10, 3, 32).parameters()) for a in ("resnet10", "resnet18", "resnet34")}
    assert n["resnet10"] < n["resnet18"] < n["resnet34"]
    assert 11_000_000 < n["resnet18"] < 11_300_000  # the CIFAR ResNet-18 has ~11.17M parameters


@pytest.mark.parametrize("bad", [dict(arch="resnet7"), dict(arch="wrn-30-2"), dict(in_channels=2), dict(num_classes=1)])
def test_bad_specs_rejected(bad):
    kw = dict(arch="resnet18", num_classes=10, in_channels=3, image_size=32) | bad
    with pytest.raises(ValueError):
        build_model(**kw)
