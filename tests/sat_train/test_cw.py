"""sat_train.cw: Carlini-Wagner L2 against the known minimum-norm adversarial of a linear model."""
import torch
import torch.nn as nn

from sat_train.cw import cw_l2


class Linear2(nn.Module):
    def __init__(self, w, b=0.0):
        super().__init__()
        self.w, self.b = nn.Parameter(w.flatten().clone()), nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        m = x.flatten(1) @ self.w + self.b
        return torch.stack([-m / 2, m / 2], 1)


def _case(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    x = 0.35 + 0.3 * torch.rand(n, 1, 4, 4, generator=g)  # interior: the box does not bind the optimum
    model = Linear2(w, b=-float(x.flatten(1).mean(0) @ w))  # decision boundary through the data
    y = model(x).argmax(1)
    return model, x, y, w


def test_cw_approaches_the_minimum_l2_distance_of_a_linear_model():
    model, x, y, w = _case()
    margin = (x.flatten(1) @ model.w + model.b).detach().abs()
    minimum = margin / w.norm()  # no L2 perturbation smaller than this can cross the boundary
    r = cw_l2(model, x, y, steps=300, search_steps=8, lr=0.01, initial_const=1.0)
    assert r.success.all()
    assert (r.l2 >= minimum - 1e-4).all()  # never beats the analytic optimum
    assert (r.l2 <= minimum * 1.1 + 2e-3).all()  # and gets close to it with a generous budget
    with torch.no_grad():
        assert (model(r.x_adv).argmax(1) != y).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    torch.testing.assert_close((r.x_adv - x).flatten(1).norm(dim=1), r.l2, atol=1e-5, rtol=1e-4)


def test_short_budget_is_deterministic_and_bounded():
    model, x, y, _ = _case(seed=1)
    a = cw_l2(model, x, y)  # the paper's budget: 3 x 20 steps from c = 1e-3
    b = cw_l2(model, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert a.x_adv.min() >= 0 and a.x_adv.max() <= 1
    # where it failed the clean input is returned and the model still predicts y
    assert torch.equal(a.x_adv[~a.success], x[~a.success]) and (a.l2[~a.success] == 0).all()
    with torch.no_grad():
        assert (model(a.x_adv[a.success]).argmax(1) != y[a.success]).all()
    assert all(p.grad is None for p in model.parameters())


def test_already_misclassified_samples_count_as_found_with_no_perturbation():
    model, x, y, _ = _case(seed=2)
    r = cw_l2(model, x, 1 - y, steps=2, search_steps=1)
    assert r.success.all() and (r.l2 < 1e-3).all()
