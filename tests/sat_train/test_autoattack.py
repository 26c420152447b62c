"""sat_train.autoattack: the torchattacks AutoAttack wrapper on a few samples (it is slow on CPU)."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("torchattacks")

from sat_train.autoattack import STANDARD_STAGES, autoattack  # noqa: E402


class Linear(nn.Module):
    """Centred linear classifier: its predictions really depend on the input (a fresh small CNN predicts
    one class everywhere, which no attack can change at small eps)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 4, bias=False)
        nn.init.normal_(self.fc.weight)

    def forward(self, x):
        return self.fc((x - 0.5).flatten(1))


def test_autoattack_runs_every_stage_and_stays_in_the_ball():
    model = Linear().eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)  # clean-correct: every stage has work to do
    y[0] = (y[0] + 1) % 4  # one already wrong: must stay non-robust
    eps = 8 / 255
    rng_before = torch.get_rng_state()
    r = autoattack(model, x, y, eps, n_classes=4, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # torchattacks' reseeding does not leak out
    assert [name for name, _ in r.stages] == list(STANDARD_STAGES)
    counts = [c for _, c in r.stages]
    assert all(a >= b for a, b in zip(counts, counts[1:])) and counts[0] <= 7 and 0 < counts[-1] < 7  # some broken, some not
    assert r.max_linf <= eps + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    with torch.no_grad():
        assert torch.equal(r.robust, model(r.x_adv).argmax(1) == y)
    assert not r.robust[0] and int(r.robust.sum()) == counts[-1]
    # a large budget breaks this weak model completely
    big = autoattack(model, x[1:4], y[1:4], 0.5, n_classes=4, seed=0)
    assert not big.robust.any() and big.max_linf <= 0.5 + 1e-6
