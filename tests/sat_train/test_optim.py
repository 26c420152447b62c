import math

import pytest
import torch

from sat_train.config import TrainConfig
from sat_train.optim import lr_factor, make_optimizer, make_scheduler


def test_cosine_piecewise_warmup():
    cos = TrainConfig(schedule="cosine")
    assert lr_factor(0, 100, cos, 0) == 1.0 and abs(lr_factor(50, 100, cos, 0) - 0.5) < 1e-12
    assert lr_factor(100, 100, cos, 0) == pytest.approx(0.0, abs=1e-12)
    pw = TrainConfig(schedule="piecewise", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(s, 100, pw, 0) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = TrainConfig(schedule="cosine")
    assert lr_factor(0, 100, warm, 10) == pytest.approx(0.1) and lr_factor(9, 100, warm, 10) == 1.0
    assert lr_factor(10, 100, warm, 10) == 1.0 and lr_factor(55, 100, warm, 10) == pytest.approx(0.5)


def test_scheduler_steps_per_batch_and_optimizers():
    cfg = TrainConfig(epochs=2, lr=0.2, schedule="cosine")
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(params, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.2 and lrs[5] == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.5)))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    adam = make_optimizer(params, TrainConfig(optimizer="adam", lr=1e-3, weight_decay=0.0))
    assert isinstance(adam, torch.optim.Adam)
