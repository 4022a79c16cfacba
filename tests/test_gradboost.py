"""Tests of frostnet.optim.GradBoost: statistics against the paper's equations, the noise's
sign, bound, mask and decay, the wrapped optimizers, LR schedulers and checkpoint round trips."""

from __future__ import annotations

import copy
import io
import math
import shutil
import warnings

import pytest
import torch
from torch import nn

from frostnet.optim import PHASES, GradBoost

OPTIMIZERS = {
    "sgd_nesterov": lambda params: torch.optim.SGD(
        params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
    ),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
    "rmsprop": lambda params: torch.optim.RMSprop(
        params, lr=1e-3, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5
    ),
}


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 4, (4,), generator=gen))
            for _ in range(n)]


def _make_model() -> nn.Module:
    torch.manual_seed(0)  # every call builds the same weights
    return _small_model()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for images, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def _equations(grads: list[list[float]], decay: float) -> tuple[list[float], list[float]]:
    """Bias-corrected moving max and min of one element per equations 5 and Algorithm 3 (M0=m0=0),
    written out with Python floats."""
    big, small = 0.0, 0.0
    for g in grads:
        big = decay * big + (1 - decay) * max(big, g)
        small = decay * small + (1 - decay) * min(small, g)
    correction = 1 - decay ** len(grads)
    return big / correction, small / correction


@pytest.mark.parametrize("phase", PHASES)
def test_statistics_match_the_equations(phase):
    decay = 0.8
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p, q], lr=0.0), decay=decay, phase=phase, clamp=1e-2)
    # Mixed signs, growing and shrinking magnitudes: the maximum must rise and then stay, the
    # minimum must go negative (the reference's minimum of |g| stuck at 0 fails here) and the
    # stored maximum must not be re-divided by the bias correction each step.
    gen = torch.Generator().manual_seed(3)
    history_p: list[torch.Tensor] = []
    history_q: list[torch.Tensor] = []
    for step in range(7):
        g_p = torch.randn(2, 3, generator=gen, dtype=torch.float64) * (3.0 if step == 2 else 1.0)
        g_q = torch.randn(4, generator=gen, dtype=torch.float64)
        p.grad = g_p.clone()
        history_p.append(g_p)
        # q misses step 3: it keeps its own step count (and takes the per-parameter path).
        q.grad = None if step == 3 else g_q.clone()
        if step != 3:
            history_q.append(g_q)
        opt.step()
        for param, history in ((p, history_p), (q, history_q)):
            got_max, got_min = opt.statistics(param)
            flat_history = [h.flatten().tolist() for h in history]
            for i in range(param.numel()):
                want_max, want_min = _equations([h[i] for h in flat_history], decay)
                assert math.isclose(got_max.flatten()[i].item(), want_max, rel_tol=1e-12)
                assert math.isclose(got_min.flatten()[i].item(), want_min, rel_tol=1e-12)
            # Stored raw (uncorrected): the correction is applied on read only.
            st = opt.boost_state[param]
            assert st["step"] == len(history)
            correction = 1 - decay ** len(history)
            torch.testing.assert_close(st["exp_max"] / correction, got_max, rtol=0, atol=0)
        if phase == "boost":
            noise = p.grad - g_p
            assert torch.all(noise * g_p >= 0)
            assert noise.abs().max() <= 1e-2 * opt.noise_factor(p) * (1 + 1e-9)
    assert opt.boost_state[p]["step"] == 7 and opt.boost_state[q]["step"] == 6
    assert opt.boost_state[p]["boost_step"] == (7 if phase == "boost" else 0)
    # The minimum really tracks negative gradients and the maximum the largest ones.
    assert (opt.statistics(p)[1] < 0).all() and (opt.statistics(p)[0] > 0).all()


def _boost_once(numel=200_000, clamp=1e-3, coin_toss=True, seed=0, zeros=100):
    """One collect step and one boost step on a single parameter; returns (opt, p, grad, noise).

    float64, so that p.grad - grad recovers the noise without float32 rounding."""
    gen = torch.Generator().manual_seed(5)
    p = nn.Parameter(torch.zeros(numel, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), clamp=clamp, coin_toss=coin_toss, seed=seed)
    p.grad = torch.randn(numel, generator=gen, dtype=torch.float64)
    opt.step()
    opt.set_phase("boost")
    grad = torch.randn(numel, generator=gen, dtype=torch.float64) * 0.5
    grad[:zeros] = 0.0
    p.grad = grad.clone()
    opt.step()
    return opt, p, grad, p.grad - grad


def test_noise_sign_bound_and_mask():
    opt, p, grad, noise = _boost_once()
    boosted = noise != 0
    # Sign matches the gradient: the noise pushes each gradient further along its direction.
    assert torch.equal(torch.sign(noise[boosted]), torch.sign(grad[boosted]))
    # Zero gradients have no sign and get no noise.
    assert not boosted[:100].any()
    # Magnitude clamped to clamp * decay factor (0.99 ** 1 at the first boost step).
    factor = opt.noise_factor(p)
    assert factor == pytest.approx(0.99)
    bound = 1e-3 * factor
    assert noise.abs().max() <= bound * (1 + 1e-9)
    # Here b is about 2, so most drawn magnitudes exceed the clamp and sit at the bound.
    assert (noise[boosted].abs() > bound * (1 - 1e-9)).float().mean() > 0.99
    # The Bernoulli(1/2) coin: about half of the elements (sd 0.0011 at this size).
    fraction = boosted[100:].float().mean().item()
    assert abs(fraction - 0.5) < 0.01


def _documented_words(numel, generator):
    """The draw's random words: two seeds from the device generator, then the first and second
    half of the (numel + 3) // 4 int64 words each from a generator seeded with its seed."""
    seeds = torch.empty(2, dtype=torch.int64).random_(generator=generator).tolist()
    words = (numel + 3) // 4
    half = (words + 1) // 2
    parts = [torch.empty(n, dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed))
             for n, seed in ((half, seeds[0]), (words - half, seeds[1]))]
    return torch.cat(parts)


def _expected_noise(opt, params, grads, generator, coin_toss=True):
    """Equations 5-8 applied to the documented draws: one int64 word per four elements (in
    parameter order, for the parameters drawn together), j = (16 bits & 0x7FFF) | 1,
    u = j / 2**14 (coin toss: k = 1 where u < 1) or j / 2**15, |psi| = -b log(u)."""
    numels = [p.numel() for p in params]
    bits = _documented_words(sum(numels), generator)
    draws = bits.view(torch.int16)[: sum(numels)].bitwise_and(0x7FFF).bitwise_or(1)
    expected = []
    for p, grad, j in zip(params, grads, draws.split(numels)):
        u = j.double().view_as(p) * (2.0**-14 if coin_toss else 2.0**-15)
        k = (u < 1).double()
        big, small = opt.statistics(p)
        psi = torch.sign(grad) * torch.clamp(-(big - small) * torch.log(u), max=opt.clamp)
        expected.append(k * opt.noise_factor(p) * psi)
    return expected


@pytest.mark.parametrize("coin_toss", [True, False])
def test_noise_matches_the_equations_exactly(coin_toss):
    """Pins the whole chain (eq. 5 scale with bias correction, sign, clamp, coin, decay) to the
    documented draws, on the flat fast path."""
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.zeros(3, 333, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), clamp=0.05, coin_toss=coin_toss, seed=21)
    reference = torch.Generator().manual_seed(21)
    for step in range(5):
        if step == 3:
            opt.set_phase("boost")
        grad = torch.randn(3, 333, generator=gen, dtype=torch.float64) * 0.02
        p.grad = grad.clone()
        opt.step()
        if opt.phase == "boost":
            (want,) = _expected_noise(opt, [p], [grad], reference, coin_toss)
            torch.testing.assert_close(p.grad - grad, want, rtol=1e-9, atol=1e-15)
            assert (want != 0).any() and (want.abs() < opt.clamp * opt.noise_factor(p)).any()


def test_noise_matches_the_equations_on_the_per_parameter_path_and_mixed_step_counts():
    gen = torch.Generator().manual_seed(6)
    p = nn.Parameter(torch.zeros(257, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(3, 41, dtype=torch.float64))
    r = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p, q], lr=0.0), clamp=0.05, phase="boost", seed=3)
    reference = torch.Generator().manual_seed(3)

    def step(params):
        grads = [torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.02 for x in params]
        for x in (p, q, r):
            x.grad = None
        for x, g in zip(params, grads):
            x.grad = g.clone()
        opt.step()
        return [x.grad - g for x, g in zip(params, grads)], grads

    step([p, q])  # flat layout over p, q
    reference.set_state(opt.state_dict()["gradboost"]["generators"]["cpu"])
    # q has no gradient: a new parameter set, handled one parameter at a time.
    noise, grads = step([p])
    torch.testing.assert_close(noise, _expected_noise(opt, [p], grads, reference), rtol=1e-9,
                               atol=1e-15)
    # r joins with its own step count; once the set {p, q, r} repeats it gets a flat layout
    # whose runs of equal step counts use their own bias corrections.
    opt.add_param_group({"params": [r]})
    step([p, q, r])
    reference.set_state(opt.state_dict()["gradboost"]["generators"]["cpu"])
    noise, grads = step([p, q, r])
    assert [opt.boost_state[x]["step"] for x in (p, q, r)] == [4, 3, 2]
    torch.testing.assert_close(noise, _expected_noise(opt, [p, q, r], grads, reference),
                               rtol=1e-9, atol=1e-15)


def test_noise_is_laplace_with_scale_max_minus_min():
    # A clamp far above the noise leaves |psi| ~ Exp(1) * b with b = max - min (eq. 5).
    opt, p, grad, noise = _boost_once(clamp=1e6, zeros=0)
    big, small = opt.statistics(p)
    scaled = noise.abs() / (opt.noise_factor(p) * (big - small))
    drawn = scaled[noise != 0]
    assert abs(drawn.mean().item() - 1.0) < 0.02
    assert abs(drawn.var().item() - 1.0) < 0.05
    assert abs((drawn > 1.0).float().mean().item() - math.exp(-1.0)) < 0.01


def test_without_coin_toss_every_element_is_boosted():
    _, _, grad, noise = _boost_once(coin_toss=False, zeros=0)
    assert (noise != 0).float().mean().item() > 0.999
    assert torch.all(noise * grad >= 0)


def test_same_seed_same_noise_other_seed_other_noise():
    noise_a = _boost_once(numel=5000, seed=7)[3]
    noise_b = _boost_once(numel=5000, seed=7)[3]
    noise_c = _boost_once(numel=5000, seed=8)[3]
    assert torch.equal(noise_a, noise_b)
    assert not torch.equal(noise_a, noise_c)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_collect_phase_adds_no_noise(name):
    batches = _batches(4)
    plain_model, boosted_model = _make_model(), _make_model()
    plain = OPTIMIZERS[name](plain_model.parameters())
    boosted = GradBoost(OPTIMIZERS[name](boosted_model.parameters()))
    assert boosted.phase == "collect"
    _train(plain_model, plain, batches)
    _train(boosted_model, boosted, batches)
    for a, b in zip(plain_model.parameters(), boosted_model.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)
    assert all(st["step"] == 4 for st in boosted.boost_state.values())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_boosted_gradient_goes_through_the_wrapped_optimizer(name):
    """A plain optimizer fed the boosted gradients lands on the same parameters: the noise is
    added before the wrapped optimizer's weight decay and momentum, and nothing else changes."""
    batches = _batches(4)
    boosted_model, plain_model = _make_model(), _make_model()
    boosted = GradBoost(OPTIMIZERS[name](boosted_model.parameters()), phase="boost", clamp=1e-2)
    plain = OPTIMIZERS[name](plain_model.parameters())
    for images, labels in batches:
        for model, opt in ((boosted_model, boosted), (plain_model, plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
        clean = [p.grad.clone() for p in boosted_model.parameters()]
        boosted.step()
        assert any(not torch.equal(p.grad, c) for p, c in zip(boosted_model.parameters(), clean))
        for p_plain, p_boosted in zip(plain_model.parameters(), boosted_model.parameters()):
            p_plain.grad.copy_(p_boosted.grad)
        plain.step()
        for a, b in zip(plain_model.parameters(), boosted_model.parameters()):
            assert torch.equal(a, b)
    # The wrapper exposes the wrapped optimizer's groups and state, not copies.
    assert boosted.param_groups is boosted.optimizer.param_groups
    assert boosted.state is boosted.optimizer.state and len(boosted.state) > 0


def test_decay_makes_the_noise_vanish():
    p = nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), noise_decay=0.3, phase="boost")
    gen = torch.Generator().manual_seed(2)
    peaks = []
    for s in range(1, 31):
        grad = torch.randn(20_000, generator=gen, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        peaks.append((p.grad - grad).abs().max().item())
        # With b >> clamp some elements always saturate: the peak is the decayed clamp exactly.
        assert peaks[-1] == pytest.approx(1e-3 * 0.7**s, rel=1e-9)
    assert peaks[-1] < 1e-4 * peaks[0]
    # noise_decay = 1 switches the noise off from the first boost step.
    opt.noise_decay = 1.0
    grad = torch.randn(20_000, generator=gen, dtype=torch.float64)
    p.grad = grad.clone()
    opt.step()
    assert torch.equal(p.grad, grad)


def test_lr_schedulers_drive_the_wrapped_optimizer():
    model = _make_model()
    opt = GradBoost(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                    phase="boost")
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(5):
            _train(model, opt, _batches(1))
            step_lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    opt2 = GradBoost(torch.optim.AdamW(model.parameters(), lr=1e-2))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=4, eta_min=0.0)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            _train(model, opt2, _batches(1))
            cosine.step()
            lrs.append(opt2.optimizer.param_groups[0]["lr"])
    want = [1e-2 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(1, 5)]
    assert lrs == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("name", ["sgd_nesterov", "adamw"])
def test_state_dict_round_trip_is_bitwise(name):
    batches = _batches(9)
    model_a = _make_model()
    opt_a = GradBoost(OPTIMIZERS[name](model_a.parameters()), seed=11)
    _train(model_a, opt_a, batches[:3])
    opt_a.set_phase("boost")
    _train(model_a, opt_a, batches[3:5])

    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    _train(model_a, opt_a, batches[5:])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b = _make_model()
    model_b.load_state_dict(checkpoint["model"])
    # Different seed, phase and clamp on purpose: the checkpoint's values must win.
    opt_b = GradBoost(OPTIMIZERS[name](model_b.parameters()), seed=99, clamp=0.5)
    opt_b.load_state_dict(checkpoint["optimizer"])
    assert (opt_b.phase, opt_b.seed, opt_b.clamp) == ("boost", 11, 1e-3)
    _train(model_b, opt_b, batches[5:])

    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        st_a, st_b = opt_a.boost_state[p_a], opt_b.boost_state[p_b]
        assert (st_a["step"], st_a["boost_step"]) == (st_b["step"], st_b["boost_step"]) == (9, 6)
        assert torch.equal(st_a["exp_max"], st_b["exp_max"])
        assert torch.equal(st_a["exp_min"], st_b["exp_min"])


def test_state_dict_layout_and_plain_optimizer_checkpoints():
    model = _make_model()
    opt = GradBoost(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), phase="boost")
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    # The wrapped optimizer's usual entries, plus everything GradBoost needs to resume.
    assert {"state", "param_groups", "gradboost"} <= set(sd)
    assert set(sd["gradboost"]) == {"phase", "decay", "clamp", "noise_decay", "coin_toss", "seed", "rule",
                                    "state", "generators"}
    assert set(sd["gradboost"]["state"]) == set(range(len(list(model.parameters()))))
    assert "cpu" in sd["gradboost"]["generators"]
    # A plain optimizer's checkpoint loads into the wrapper (statistics restart) and back.
    plain_sd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    opt.load_state_dict(plain_sd)
    assert len(opt.boost_state) == 0
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(copy.deepcopy(sd))
    # A corrupted GradBoost entry is rejected before anything is loaded.
    bad = copy.deepcopy(sd)
    bad["gradboost"]["phase"] = "warmup"
    with pytest.raises(ValueError, match="'warmup'.*collect, boost"):
        opt.load_state_dict(bad)


def test_add_param_group_closure_and_zero_grad():
    model = _make_model()
    head = nn.Linear(4, 4)
    opt = GradBoost(torch.optim.SGD(model.parameters(), lr=0.1), phase="boost")
    _train(model, opt, _batches(2))
    opt.add_param_group({"params": head.parameters(), "lr": 0.01})
    assert opt.optimizer.param_groups[-1]["lr"] == 0.01
    images, labels = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(model(images)), labels)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        assert torch.is_tensor(loss)
    assert opt.boost_state[head.weight]["step"] == 3
    assert opt.boost_state[next(model.parameters())]["step"] == 5
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"decay": 1.0}, ValueError, r"decay must be a number in \[0, 1\), got 1.0"),
        ({"decay": -0.1}, ValueError, r"decay .* got -0.1"),
        ({"clamp": -1e-3}, ValueError, r"clamp must be a finite number >= 0, got -0.001"),
        ({"clamp": float("inf")}, ValueError, r"clamp .* got inf"),
        ({"noise_decay": 1.5}, ValueError, r"noise_decay must be a number in \[0, 1\], got 1.5"),
        ({"coin_toss": "yes"}, TypeError, r"coin_toss must be a bool .* got 'yes'"),
        ({"seed": -1}, ValueError, r"seed must be an int .* got -1"),
        ({"phase": "train"}, ValueError, r"unknown GradBoost phase 'train'; valid phases are "
                                         r"collect, boost"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(error, match=match):
        GradBoost(torch.optim.SGD(params, lr=0.1), **kwargs)


def test_bad_phase_and_optimizers_raise_clear_errors():
    params = [nn.Parameter(torch.zeros(2))]
    opt = GradBoost(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="unknown GradBoost phase 'warmup'; valid phases are "
                                         "collect, boost"):
        opt.set_phase("warmup")
    assert opt.phase == "collect"
    with pytest.raises(ValueError, match="clamp .* got -2"):
        opt.clamp = -2
    with pytest.raises(TypeError, match="torch.optim.Optimizer instance, got list"):
        GradBoost(params)
    with pytest.raises(TypeError, match="already a GradBoost"):
        GradBoost(opt)
    with pytest.raises(TypeError, match="LBFGS"):
        GradBoost(torch.optim.LBFGS(params))


def test_noise_does_not_depend_on_the_thread_count(monkeypatch):
    """Above the parallel threshold the second half of the draw runs on a worker thread when
    torch has several intra-op threads; the noise must equal the one-thread draw bit for bit and
    the documented equations."""
    from frostnet.optim import gradboost

    numel = gradboost._PARALLEL_NUMEL * 2 + 13  # odd tail: the halves differ in size
    pool_uses = []
    real_pool = gradboost._worker_pool
    monkeypatch.setattr(gradboost, "_worker_pool", lambda: pool_uses.append(1) or real_pool())
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(numel, generator=gen, dtype=torch.float64) * 0.02 for _ in range(3)]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        p = nn.Parameter(torch.zeros(numel, dtype=torch.float64))
        opt = GradBoost(torch.optim.SGD([p], lr=0.0), clamp=0.05, phase="boost", seed=5)
        reference = torch.Generator().manual_seed(5)
        noises = []
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
            noises.append(p.grad - grad)
        (want,) = _expected_noise(opt, [p], [grads[-1]], _advanced(reference, numel, len(grads) - 1))
        torch.testing.assert_close(noises[-1], want, rtol=1e-9, atol=1e-15)
        results.append(noises)
    torch.set_num_threads(1)
    assert len(pool_uses) == len(grads)  # only the two-thread run used the worker
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _advanced(generator, numel, draws):
    """``generator`` after ``draws`` earlier draws of ``numel`` elements."""
    for _ in range(draws):
        _documented_words(numel, generator)
    return generator


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend needs a C++ compiler (.ci/run installs g++)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_unfused(dtype):
    """fused=True (one torch.compile kernel) follows the same equations and random stream: equal
    to the unfused path up to rounding, through the collect phase, the boost phase and a step
    with mixed step counts (which takes the unfused path)."""
    gen = torch.Generator().manual_seed(9)
    shapes = [(30, 7), (50,)]
    runs = []
    for fused in (False, True):
        params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        opt = GradBoost(torch.optim.SGD(params, lr=0.1, momentum=0.9), clamp=0.05, seed=3, fused=fused)
        runs.append((params, opt))
    late = [nn.Parameter(torch.zeros(20, dtype=dtype)) for _ in runs]
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-15}
    for step in range(7):
        grads = [torch.randn(s, generator=gen, dtype=dtype) * 0.02 for s in shapes]
        extra = torch.randn(20, generator=gen, dtype=dtype) * 0.02
        for (params, opt), lp in zip(runs, late):
            if step == 2:
                opt.set_phase("boost")
            if step == 4:
                opt.add_param_group({"params": [lp]})
            for p, g in zip(params, grads):
                p.grad = g.clone()
            lp.grad = extra.clone() if step >= 4 else None
            opt.step()
        (p0, o0), (p1, o1) = runs
        for a, b in zip(p0 + [late[0]], p1 + [late[1]]):
            torch.testing.assert_close(a, b, **tol)
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, **tol)
        for a, b in zip(p0, p1):
            for x, y in zip(o0.statistics(a), o1.statistics(b)):
                torch.testing.assert_close(x, y, **tol)
    assert o1.boost_state[p1[0]]["boost_step"] == 5 and (p1[0].grad != 0).any()
    # The fused optimizer's state dict loads into an unfused one and vice versa.
    o0.load_state_dict(copy.deepcopy(o1.state_dict()))


def test_fused_argument_and_compile_failure(monkeypatch):
    from frostnet.optim import _gradboost_buffers

    p = nn.Parameter(torch.zeros(5))
    with pytest.raises(TypeError, match="fused must be a bool"):
        GradBoost(torch.optim.SGD([p], lr=0.1), fused=1)

    def broken(*args, **kwargs):
        def fail(*a):
            raise OSError("no C++ compiler")
        return fail

    monkeypatch.setattr(_gradboost_buffers, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    opt = GradBoost(torch.optim.SGD([p], lr=0.1), fused=True)
    p.grad = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"\(fused=True\) could not run its statistics kernel.*no C\+\+ compiler.*fused=False"):
        opt.step()
    # Nothing was lost: no step counted, the wrapped optimizer did not step.
    assert opt.boost_state[p]["step"] == 0 and torch.equal(p.detach(), torch.zeros(5))


# ---------------------------------------------------------------------------------------------
# rule="authors": the published code's statistics and clamp order


def _authors_equations(grads: list[float], decay: float) -> tuple[float, float]:
    """The authors' statistics of one element, written out: |g| tracked from M0 = m0 = 0, and the
    stored values divided by 1 - decay**t in place every step (so the division compounds)."""
    big = small = 0.0
    for t, g in enumerate(grads, start=1):
        correction = 1 - decay**t
        big = (decay * big + (1 - decay) * max(big, abs(g))) / correction
        small = (decay * small + (1 - decay) * min(small, abs(g))) / correction
    return big, small


def test_authors_rule_statistics_match_their_equations():
    decay = 0.8
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), decay=decay, rule="authors")
    gen = torch.Generator().manual_seed(3)
    history = []
    for _ in range(6):
        g = torch.randn(5, generator=gen, dtype=torch.float64)
        history.append(g.tolist())
        p.grad = g.clone()
        opt.step()
    got_max, got_min = opt.statistics(p)
    for i in range(5):
        want_max, want_min = _authors_equations([h[i] for h in history], decay)
        assert math.isclose(got_max[i].item(), want_max, rel_tol=1e-12)
        assert got_min[i].item() == want_min == 0.0  # min(m, |g|) from 0 never leaves 0
    # and it is not the paper rule's bias-corrected signed maximum
    paper_max, _ = _equations([h[0] for h in history], decay)
    assert got_max[0].item() > 2 * abs(paper_max)


def test_authors_rule_decays_before_the_clamp_and_plateaus_there():
    # |g| statistics inflated by the compounding division: every boosted element sits exactly at the
    # clamp while decay**s * b is far above it (the paper rule would give clamp * decay**s instead).
    p = nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    clamp = 1e-3
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), clamp=clamp, noise_decay=0.1, rule="authors", phase="boost")
    gen = torch.Generator().manual_seed(8)
    for step in range(1, 4):
        grad = torch.randn(20_000, generator=gen, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        noise = p.grad - grad
        boosted = noise != 0
        assert torch.equal(torch.sign(noise[boosted]), torch.sign(grad[boosted]))
        assert abs(boosted.double().mean().item() - 0.5) < 0.02  # the coin
        plateau = (noise[boosted].abs() - clamp).abs() < 1e-15
        assert plateau.double().mean().item() > 0.95, step
    paper = GradBoost(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.0), noise_decay=0.1)
    assert paper.rule == "paper"  # the default


def test_authors_rule_round_trips_and_rejects_bad_settings():
    p = nn.Parameter(torch.zeros(10))
    opt = GradBoost(torch.optim.SGD([p], lr=0.0), rule="authors", phase="boost")
    p.grad = torch.ones(10)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert sd["gradboost"]["rule"] == "authors"
    other = GradBoost(torch.optim.SGD([p], lr=0.0))
    other.load_state_dict(sd)
    assert other.rule == "authors"
    torch.testing.assert_close(other.statistics(p)[0], opt.statistics(p)[0])
    del sd["gradboost"]["rule"]  # a checkpoint from before the option: the paper rule
    other.load_state_dict(sd)
    assert other.rule == "paper"
    with pytest.raises(ValueError, match="unknown GradBoost rule 'author'; valid rules are paper, authors"):
        GradBoost(torch.optim.SGD([p], lr=0.0), rule="author")
    with pytest.raises(ValueError, match="rule='authors'\\) has no fused kernel"):
        GradBoost(torch.optim.SGD([p], lr=0.0), rule="authors", fused=True)
