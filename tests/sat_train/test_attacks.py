"""sat_train.attacks: analytic optimum on a linear model, eps-ball / [0, 1] bounds, restarts, and an
independent check against torchattacks.PGD on a small model trained on real Fashion-MNIST."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sat_train.attacks import fgsm, input_grad, pgd, project_l2, project_linf

FMNIST = Path("/usr/share/datasets/fashion-mnist")


class Linear2(nn.Module):
    """Two-class linear model with margin m(x) = w.x + b: logits (-m/2, m/2)."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        m = x.flatten(1) @ self.w + self.b
        return torch.stack([-m / 2, m / 2], 1)


def _linear_case(seed=0, n=32, shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    w = torch.randn(d, generator=g)
    w[w.abs() < 0.05] = 0.5  # no zero weights: the optimum is unique
    x = torch.rand(n, *shape, generator=g)
    x[:4].view(4, -1)[:, :5] = 0.0  # pixels on the box edges: the eps-ball and [0, 1] interact
    x[4:8].view(4, -1)[:, :5] = 1.0
    y = torch.randint(0, 2, (n,), generator=g)
    return Linear2(w), x, y, w


def _linf_optimum(x, y, w, eps):
    # minimise the true class's margin: move every pixel against it to the edge of [x-eps, x+eps] & [0, 1]
    s = w.view(1, *x.shape[1:]) * (2 * y.float() - 1).view(-1, 1, 1, 1)  # d(true margin)/dx
    return torch.where(s > 0, (x - eps).clamp(min=0), (x + eps).clamp(max=1))


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 0.3])
def test_pgd_linf_reaches_the_analytic_optimum_of_a_linear_model(eps):
    model, x, y, w = _linear_case()
    target = _linf_optimum(x, y, w, eps)
    steps = int(np.ceil(2 / 0.25)) + 2  # step eps/4 crosses the whole 2*eps box from any start
    x_adv = pgd(model, x, y, eps, eps / 4, steps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_adv, target, atol=1e-6, rtol=0)
    torch.testing.assert_close(fgsm(model, x, y, eps), target, atol=1e-6, rtol=0)
    # and the loss there is the analytic worst case, strictly above the clean loss
    ce = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    assert torch.all(ce(x_adv) >= ce(x) - 1e-6) and ce(x_adv).sum() > ce(x).sum()


def test_pgd_l2_reaches_the_analytic_optimum_of_a_linear_model():
    model, _, y, w = _linear_case()
    x = 0.3 + 0.4 * torch.rand(len(y), 1, 4, 4, generator=torch.Generator().manual_seed(2))  # box never binds
    eps = 0.1
    direction = (w / w.norm()).view(1, 1, 4, 4) * (2 * y.float() - 1).view(-1, 1, 1, 1)
    target = x - eps * direction
    exact = pgd(model, x, y, eps, eps / 4, 8, norm="l2", random_start=False)
    torch.testing.assert_close(exact, target, atol=1e-6, rtol=0)
    from_random = pgd(model, x, y, eps, eps / 4, 60, norm="l2", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(from_random, target, atol=2e-4, rtol=0)


def _conv_model(seed=0, c=3, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)).eval()


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("linf", 0.5), ("l2", 0.5), ("l2", 3.0)])
@pytest.mark.parametrize("restarts", [1, 3])
def test_attacks_stay_in_the_eps_ball_and_in_unit_box(norm, eps, restarts):
    model = _conv_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[:4] = (x[:4] > 0.5).float()  # saturated pixels: clamping to [0, 1] must hold at the edges
    y = torch.randint(0, 5, (16,), generator=g)
    x_adv = pgd(model, x, y, eps, eps / 4, 10, norm=norm, restarts=restarts, generator=g)
    delta = (x_adv - x).flatten(1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
        f = fgsm(model, x, y, eps)
        assert f.min() >= 0 and f.max() <= 1 and (f - x).abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps * (1 + 1e-5)
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. the input only


def test_projections():
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(4, 3, 5, 5, generator=g), 2 * torch.rand(4, 3, 5, 5, generator=g) - 0.5
    p = project_linf(z, x, 0.1)
    assert (p - x).abs().max() <= 0.1 + 1e-7 and p.min() >= 0 and p.max() <= 1
    q = project_l2(z, x, 0.2)
    assert (q - x).flatten(1).norm(dim=1).max() <= 0.2 + 1e-6 and q.min() >= 0 and q.max() <= 1
    inside = x + 0.01 * torch.sign(z - x) / 75 ** 0.5  # already inside the L2 ball and the box: unchanged
    torch.testing.assert_close(project_l2(inside.clamp(0, 1), x, 0.2), inside.clamp(0, 1))


def test_restarts_never_weaken_the_attack():
    model = _conv_model(1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    y = model(x).argmax(1)  # start from correctly classified samples
    eps = 2 / 255
    one = pgd(model, x, y, eps, eps / 4, 3, generator=torch.Generator().manual_seed(9))
    three = pgd(model, x, y, eps, eps / 4, 3, restarts=3, generator=torch.Generator().manual_seed(9))
    fooled1, fooled3 = model(one).argmax(1) != y, model(three).argmax(1) != y
    assert torch.all(fooled3 >= fooled1)  # the first restart is the 1-restart run: its successes are kept
    torch.testing.assert_close(three[fooled1], one[fooled1])


def test_input_grad_matches_finite_differences():
    model, x, y, _ = _linear_case(n=3)
    model = model.double()
    x = x.double()
    g = input_grad(model, x, y)
    i = (0, 0, 1, 2)
    h = 1e-6
    xp, xm = x.clone(), x.clone()
    xp[i] += h
    xm[i] -= h
    ce = lambda z: F.cross_entropy(model(z), y, reduction="sum").detach()  # noqa: E731
    assert abs((ce(xp) - ce(xm)).item() / (2 * h) - g[i].item()) < 1e-5


# ----------------------------------------------------------------------------- independent check

def _read_idx(path: Path, count: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3]
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        per = int(np.prod(dims[1:])) if ndim > 1 else 1
        return np.frombuffer(f.read(per * count), dtype=np.uint8).reshape(count, *dims[1:])


def fashion_mnist(split: str, count: int):
    prefix = "train" if split == "train" else "t10k"
    images = FMNIST / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        pytest.skip(f"{images} missing (make setup installs Debian's dataset-fashion-mnist)")
    x = torch.from_numpy(_read_idx(images, count).copy()).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(_read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz", count).astype(np.int64))
    return x, y


@pytest.fixture(scope="module")
def trained_fmnist_model():
    """A small MLP trained for a few seconds on 3000 real Fashion-MNIST images (~80% clean)."""
    torch.manual_seed(0)
    x, y = fashion_mnist("train", 3000)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model.eval()


def test_pgd_accuracy_agrees_with_torchattacks(trained_fmnist_model):
    torchattacks = pytest.importorskip("torchattacks")
    model = trained_fmnist_model
    x, y = fashion_mnist("test", 1000)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.6, f"the test model did not train (clean accuracy {clean:.2f})"
    for eps in (8 / 255, 16 / 255):  # mid-range robust accuracy (~60% and ~35%): differences would show
        alpha, steps = eps / 4, 10
        ours = pgd(model, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)  # a different random start than ours: agreement must not hinge on equal draws
        theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        with torch.no_grad():
            acc_ours = (model(ours).argmax(1) == y).float().mean().item()
            acc_theirs = (model(theirs).argmax(1) == y).float().mean().item()
        assert acc_ours < clean - 0.1, "PGD did not attack at all"
        assert abs(acc_ours - acc_theirs) <= 0.02, (eps * 255, acc_ours, acc_theirs)
        # what sat-train eval runs (first fooling iterate kept): at least as strong, and still close
        early = pgd(model, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(0), stop_when_fooled=True)
        with torch.no_grad():
            acc_early = (model(early).argmax(1) == y).float().mean().item()
        # (+ 0.002: the shrinking batch may round differently in the last bit and flip a borderline sample)
        assert acc_theirs - 0.02 <= acc_early <= acc_ours + 0.002, (eps * 255, acc_early, acc_ours, acc_theirs)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_stop_when_fooled_is_never_weaker_and_stays_in_bounds(norm, eps, trained_fmnist_model):
    model = trained_fmnist_model
    x, _ = fashion_mnist("test", 200)
    with torch.no_grad():
        y = model(x).argmax(1)
    plain = pgd(model, x, y, eps, eps / 4, 8, norm=norm, generator=torch.Generator().manual_seed(1))
    early = pgd(model, x, y, eps, eps / 4, 8, norm=norm, generator=torch.Generator().manual_seed(1),
                stop_when_fooled=True)
    with torch.no_grad():
        fooled_plain, fooled_early = model(plain).argmax(1) != y, model(early).argmax(1) != y
    assert 0 < int(fooled_plain.sum()) < len(y)  # a case where the attack half works
    # same random start and trajectory up to the first fooling iterate, which is then kept (+1: a smaller
    # batch may round differently in the last bit and flip one borderline sample)
    assert int(fooled_early.sum()) >= int(fooled_plain.sum()) - 1
    assert int((fooled_plain & ~fooled_early).sum()) <= 1
    delta = (early - x).flatten(1)
    assert early.min() >= 0 and early.max() <= 1
    assert (delta.abs().max() <= eps + 1e-6) if norm == "linf" else (delta.norm(dim=1).max() <= eps * (1 + 1e-5))
    # never-fooled samples end at (almost always exactly) the same last iterate as plain PGD
    same = ((early - plain).flatten(1).abs().amax(1) < 1e-6)[~fooled_early]
    assert same.float().mean() > 0.95
