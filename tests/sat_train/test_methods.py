import pytest
import torch
import torch.nn.functional as F

from sat_train.config import ConfigError, from_dict
from sat_train.methods import METHODS, Method, config_p, config_tau, curriculum_p, curriculum_tau, kl_sum
from sat_train.models import build_model

EPS = 8 / 255


class Recorder(torch.nn.Module):
    """Wraps a model and records every input and the train/eval mode it was called in."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x):
        self.calls.append((x.detach().clone(), self.training))
        return self.inner(x)


def setup(seed=0, n=8):
    torch.manual_seed(seed)
    model = Recorder(build_model("tiny-cnn", 4, 3, 8))
    x = torch.rand(n, 3, 8, 8)
    s = torch.rand(n, 1, 8, 8) * 2 - 1
    y = torch.randint(0, 4, (n,))
    return model, x, s, y


def gens(seed=0):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def test_curriculum_formula():
    assert curriculum_p(0) == 0.0
    for epoch in range(0, 60, 7):
        assert curriculum_p(epoch) == pytest.approx(1 - 0.6 ** (epoch / 10))
    assert curriculum_p(10) == pytest.approx(0.4) and curriculum_p(10, a=0.5) == pytest.approx(0.5)
    assert all(curriculum_p(e) < curriculum_p(e + 1) < 1 for e in range(100))


def test_curriculum_tau_option_and_final_p():
    # p = 1 - a^(epoch/tau) for any tau; tau = 10 is the paper's and stays the default
    for tau in (1.0, 2.5, 10.0, 40.0):
        for epoch in range(12):
            assert curriculum_p(epoch, 0.6, tau) == pytest.approx(1 - 0.6 ** (epoch / tau))
    assert config_tau(from_dict({})) == 10.0 and config_p(from_dict({}), 10) == pytest.approx(0.4)
    cfg = from_dict({"sat_tau": 2.0, "sat_a": 0.5, "epochs": 6})
    assert [config_p(cfg, e) for e in range(6)] == pytest.approx([1 - 0.5 ** (e / 2) for e in range(6)])
    # sat_final_p solves tau so the last epoch (epochs - 1) reaches it, whatever the run length
    for epochs in (2, 6, 30, 100):
        for final in (0.25, 0.6, 0.9):
            cfg = from_dict({"epochs": epochs, "sat_final_p": final})
            tau = curriculum_tau(0.6, epochs, final_p=final)
            assert config_tau(cfg) == tau
            assert config_p(cfg, epochs - 1) == pytest.approx(final)
            assert [config_p(cfg, e) for e in range(epochs)] == pytest.approx(
                [1 - 0.6 ** (e / tau) for e in range(epochs)])
    assert curriculum_tau(0.6, 100, final_p=1 - 0.6 ** 9.9) == pytest.approx(10.0)  # the paper's 100 epochs
    assert config_p(from_dict({"epochs": 6, "sat_final_p": 0.9, "sat_p": 0.3}), 5) == 0.3  # a fixed p wins
    for bad in ({"epochs": 1, "sat_final_p": 0.9}, {"sat_final_p": 1.0}, {"sat_final_p": 0.0},
                {"sat_final_p": 0.5, "sat_tau": 3.0}, {"sat_final_p": 0.5, "sat_a": 1.0}, {"sat_tau": 0.0}):
        with pytest.raises(ConfigError, match="sat_"):
            from_dict(bad)


def test_sat_p1_is_saliency_step_p0_is_sign_noise():
    model, x, s, y = setup()
    g, c = gens()
    out = Method("sat").step(model, model, x, s, y, p=1.0, generator=g, coin=c)
    (seen, training), = model.calls
    assert torch.equal(seen, torch.clamp(x - EPS * s, 0, 1)) and training and out.perturbation == "sat"
    assert out.loss.item() == pytest.approx(F.cross_entropy(model.inner(seen), y).item(), rel=1e-6)
    model.calls.clear()
    Method("sat").step(model, model, x, s, y, p=0.0, generator=g, coin=c)
    seen = model.calls[0][0]
    assert ((seen == torch.clamp(x - EPS, 0, 1)) | (seen == torch.clamp(x + EPS, 0, 1))).all()


def _in_ball(x_adv, x, eps=EPS):
    return bool(((x_adv - x).abs() <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1)


@pytest.mark.parametrize("name,mode", [("pgd", True), ("fgsm-rs", True), ("trades", False)])
def test_attacks_stay_in_ball_and_use_the_literature_bn_mode(name, mode):
    model, x, s, y = setup()
    g, c = gens()
    out = Method(name).step(model, model, x, s, y, p=0.5, generator=g, coin=c)
    assert model.training  # restored after the attack
    attack_calls = model.calls[:-1] if name != "trades" else model.calls[:-2]
    assert attack_calls and all(training == mode for _, training in attack_calls)
    trained = model.calls[-1][0]
    assert _in_ball(trained, x) and not torch.equal(trained, x) and out.perturbation == name
    with torch.no_grad():
        model.inner.eval()
        # the attack raises the loss it maximizes compared with the clean input
        if name == "trades":
            p_clean = F.softmax(model.inner(x), 1)
            assert kl_sum(model.inner(trained), p_clean) > kl_sum(model.inner(x), p_clean)
        else:
            assert F.cross_entropy(model.inner(trained), y) > F.cross_entropy(model.inner(x), y)


def test_attack_bn_override():
    model, x, s, y = setup()
    g, c = gens()
    Method("pgd", attack_bn="eval", pgd_steps=2).step(model, model, x, s, y, p=0.5, generator=g, coin=c)
    assert [t for _, t in model.calls] == [False, False, True]


def test_fgsm_rs_step_is_1_25_eps_from_the_random_start():
    model, x, s, y = setup()
    x = x * 0.5 + 0.25  # away from the image box so only the eps ball clips
    g, c = gens()
    Method("fgsm-rs").step(model, model, x, s, y, p=0.5, generator=g, coin=c)
    start, trained = model.calls[0][0], model.calls[1][0]
    assert ((start - x).abs() <= EPS + 1e-6).all()
    moved = (trained - start).abs()
    # each coordinate moved by 1.25 eps unless the eps-ball clipped it
    assert ((moved - 1.25 * EPS).abs() < 1e-5).logical_or((trained - x).abs() >= EPS - 1e-6).all()


def test_trades_beta0_is_clean_ce_and_loss_formula():
    model, x, s, y = setup()
    g, c = gens()
    out = Method("trades", trades_beta=0.0, trades_steps=2).step(model, model, x, s, y, p=0.5, generator=g, coin=c)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.clean_logits, y).item(), rel=1e-6)
    out6 = Method("trades", trades_steps=2).step(model, model, x, s, y, p=0.5, generator=g, coin=c)
    kl = kl_sum(out6.train_logits, F.softmax(out6.clean_logits, 1)) / len(x)
    assert out6.loss.item() == pytest.approx((F.cross_entropy(out6.clean_logits, y) + 6 * kl).item(), rel=1e-5)


@pytest.mark.parametrize("name,other", [("sat+pgd", "pgd"), ("sat+trades", "trades")])
def test_mixed_methods_flip_a_coin_per_batch(name, other):
    model, x, s, y = setup(n=4)
    kinds = []
    g, c = gens()
    for _ in range(16):
        kinds.append(Method(name, pgd_steps=1, trades_steps=1).step(model, model, x, s, y, p=1.0, generator=g,
                                                                     coin=c).perturbation)
    assert set(kinds) == {"sat", other}
    always = {Method(name, mix_prob=1.0, pgd_steps=1, trades_steps=1).step(model, model, x, s, y, p=1.0, generator=g,
                                                                          coin=c).perturbation for _ in range(4)}
    never = {Method(name, mix_prob=0.0, pgd_steps=1, trades_steps=1).step(model, model, x, s, y, p=1.0, generator=g,
                                                                         coin=c).perturbation for _ in range(4)}
    assert always == {"sat"} and never == {other}


def test_all_methods_known_and_bad_name():
    assert set(METHODS) == {"standard", "sat", "pgd", "sat+pgd", "trades", "sat+trades", "fgsm-rs"}
    with pytest.raises(ValueError, match="unknown method"):
        Method("mixup")


@pytest.mark.parametrize("name", ["sat", "pgd", "trades"])
def test_channels_last_changes_layout_not_results(name):
    losses = []
    for cl in (False, True):
        model, x, s, y = setup()  # fresh: the first pass moves BatchNorm running stats the eval-mode attack reads
        g, c = gens()
        out = Method(name, channels_last=cl, pgd_steps=2, trades_steps=2).step(model, model, x, s, y, p=0.5,
                                                                           generator=g, coin=c)
        losses.append(out.loss.item())
        seen = model.calls[-1][0]
        assert seen.is_contiguous(memory_format=torch.channels_last) or not cl
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_fit_follows_and_records_the_final_p_curriculum(tiny_shards, tmp_path):
    import json

    from sat_train.fit import fit

    cfg = from_dict(dict(shards=str(tiny_shards(num_samples=32, per_shard=16)), run=str(tmp_path / "run"),
                         arch="tiny-cnn", epochs=3, batch_size=16, limit_batches=1, loader_backend="torch",
                         num_workers=0, progress=False, method="sat", sat_final_p=0.9))
    summary = fit(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tau = curriculum_tau(0.6, 3, final_p=0.9)
    assert [r["p"] for r in rows] == pytest.approx([0.0, 1 - 0.6 ** (1 / tau), 0.9])
    assert summary["final_p"] == pytest.approx(0.9) and summary["sat_tau"] == pytest.approx(tau)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sat_final_p"] == 0.9
