"""Tests of the QAT methods in frostnet.quant: OCTAV (against its recursion and a brute-force MSE
sweep), MAD/PWL gradients, EWGS (against Eqs. 1-4, torch's STE at delta = 0 and a Hutchinson
estimate that is exact on a quadratic loss), state dict round trips and INT8 conversion."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import frostnet
from frostnet import quant
from frostnet.optim import TransitionRateScheduler

BACKENDS = ["x86", "qnnpack"]
BITS = {8: (None, None), 4: ((-8, 7), (0, 15))}  # W8A8, and W4A4 simulated inside INT8


# one intra-op thread: tiny tensors on 2 shared cores (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# OCTAV


def _mse_model(x: torch.Tensor, s: float, bits: int, unsigned: bool = False) -> float:
    """The OCTAV paper's clipped quantization MSE J(s) (Eq. 4; Appendix A for unsigned), written
    out here independently of frostnet: discretization noise 4^-B/3 s^2 on the non-zero elements
    inside the clip range, squared clipping error outside."""
    m = x.double().clamp_min(0) if unsigned else x.double().abs()
    noise = 4.0 ** -bits / (12.0 if unsigned else 3.0)
    inside = ((m > 0) & (m <= s)).sum()
    return float((noise * s * s * inside + ((m - s).clamp_min(0) ** 2).sum()) / m.numel())


def test_octav_recursion_steps_by_hand():
    # x has one zero (excluded), B = 2: 4^-2 / 3 = 1/48.
    x = torch.tensor([0.0, 0.1, -0.2, 0.5, -1.0, 3.0])
    # s1 = 0.4: |x| > s1 for {0.5, 1, 3} (sum 4.5), 0 < |x| <= s1 for {0.1, 0.2}
    s2 = 4.5 / (2 / 48 + 3)
    assert quant.octav_clip(x, 2, init=torch.tensor(0.4), iterations=1).item() == pytest.approx(s2, rel=1e-6)
    # s2 = 1.479: only 3 is clipped, four elements inside; the next step gives the same set: fixed point
    s3 = 3.0 / (4 / 48 + 1)
    assert quant.octav_clip(x, 2, init=torch.tensor(0.4), iterations=2).item() == pytest.approx(s3, rel=1e-6)
    assert quant.octav_clip(x, 2, init=torch.tensor(0.4)).item() == pytest.approx(s3, rel=1e-6)
    # the default start, E[|x| | x != 0] = 4.8 / 5, lands on the same fixed point
    assert quant.octav_clip(x, 2).item() == pytest.approx(s3, rel=1e-6)
    # unsigned (Appendix A): 4^-B / 12 and x instead of |x|; negative values are ignored
    u = torch.tensor([0.0, 0.2, 0.4, 2.0, -5.0])
    first = 2.4 / (1 / 192 + 2)  # from s1 = 0.3: {0.4, 2.0} clipped, {0.2} inside
    assert quant.octav_clip(u, 2, unsigned=True, init=torch.tensor(0.3), iterations=1).item() == pytest.approx(first, rel=1e-6)
    assert quant.octav_clip(u, 2, unsigned=True).item() == pytest.approx(2.0 / (2 / 192 + 1), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_octav_matches_a_brute_force_mse_sweep(bits):
    x = torch.distributions.Laplace(0.0, 1.0).sample((3000,))
    x[::4] = 0.0  # a quarter zeros: excluded by OCTAV, and they cannot change the optimum
    s = quant.octav_clip(x, bits).item()
    assert s == pytest.approx(quant.octav_clip(x[x != 0], bits).item(), rel=1e-6)
    grid = torch.linspace(1e-3, float(x.abs().max()), 6001).tolist()
    sweep = [_mse_model(x, g, bits) for g in grid]
    best = min(sweep)
    # Newton's fixed point ignores the jump of the discretization term at each data point, which
    # costs ~0.15% at 2 bits and nothing measurable above; a wrong B or noise factor costs >= 1%.
    assert _mse_model(x, s, bits) <= best * (1 + 2e-3)
    assert abs(s - grid[sweep.index(best)]) < 0.1 * s
    # and the real quantizer (torch's symmetric INT grid on [-s, s]) is within 2% of its own sweep
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def empirical(c: float) -> float:
        q = torch.fake_quantize_per_tensor_affine(x, c / ((qmax - qmin) / 2), 0, qmin, qmax)
        return float(((q - x) ** 2).mean())

    assert empirical(s) <= 1.02 * min(empirical(g) for g in grid[::30])
    # the library's own J is the same function
    assert quant.clipped_quantization_mse(x, s, bits).item() == pytest.approx(_mse_model(x, s, bits), rel=1e-6)


def test_octav_per_channel_is_per_row_and_unsigned_sweep():
    w = torch.randn(5, 3, 3, 3) * torch.linspace(0.1, 2.0, 5).reshape(5, 1, 1, 1)
    per_channel = quant.octav_clip(w, 4, ch_axis=0)
    rows = torch.cat([quant.octav_clip(w[c], 4) for c in range(5)])
    torch.testing.assert_close(per_channel, rows)
    a = torch.relu(torch.randn(2000))
    s = quant.octav_clip(a, 4, unsigned=True).item()
    grid = torch.linspace(1e-3, float(a.max()), 3001).tolist()
    assert _mse_model(a, s, 4, unsigned=True) <= min(_mse_model(a, g, 4, unsigned=True) for g in grid) * (1 + 2e-3)


def test_octav_observer_static_calibration_and_qparams():
    a, b = torch.randn(500), 3 * torch.randn(500)
    obs = quant.OctavObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, iterations=50)
    obs(a)
    obs(b)
    s = (quant.octav_clip(a, 8, iterations=50) + quant.octav_clip(b, 8, iterations=50)) / 2  # running mean
    torch.testing.assert_close(obs.max_val, s)
    scale, zp = obs.calculate_qparams()
    torch.testing.assert_close(scale, s / 127.5)  # torch's symmetric qint8 step: [-s, s] over 255 steps
    assert int(zp) == 0
    # unsigned activations: [0, s] with the unsigned recursion, 4-bit range (0, 15)
    act = quant.OctavObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=15)
    r = torch.relu(torch.randn(1000))
    act(r)
    s = quant.octav_clip(r, 4, unsigned=True)
    scale, zp = act.calculate_qparams()
    assert act.min_val.item() == 0.0 and int(zp) == 0
    torch.testing.assert_close(scale, s / 15, rtol=1e-5, atol=0)
    # per-channel weights
    w = torch.randn(4, 8)
    wobs = quant.OctavObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    wobs(w)
    torch.testing.assert_close(wobs.max_val, quant.octav_clip(w, 8, ch_axis=0))


def _fixed_grid_fq(gradient: str) -> quant.OctavFakeQuantize:
    fq = quant.OctavFakeQuantize(observer=quant.OctavObserver, quant_min=-8, quant_max=7, dtype=torch.qint8,
                                 qscheme=torch.per_tensor_symmetric, gradient=gradient)
    fq.disable_observer()
    fq.scale.fill_(0.1)  # levels -0.8 ... 0.7
    fq.zero_point.zero_()
    return fq


@pytest.mark.parametrize("gradient, expected", [
    ("mad", [1.0, 1.0, 1.0, 0.7 / 0.9, 0.8 / 1.6]),   # alpha = clip(x) / x outside the range
    ("pwl", [1.0, 1.0, 1.0, 0.0, 0.0]),               # torch's default: zero outside
    ("ste", [1.0, 1.0, 1.0, 1.0, 1.0]),               # passes everywhere
])
def test_clipped_gradients_mad_pwl_ste(gradient, expected):
    x = torch.tensor([0.04, 0.3, 0.72, 0.9, -1.6], requires_grad=True)
    y = _fixed_grid_fq(gradient)(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.3, 0.7, 0.7, -0.8]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor(expected))


def test_octav_qconfig_picks_mad_for_weights_pwl_for_activations():
    qconfig = quant.get_octav_qconfig("x86")
    assert qconfig.weight().gradient == "mad" and qconfig.activation().gradient == "pwl"
    with pytest.raises(ValueError, match="unknown OCTAV gradient 'sgd'; valid choices: mph, mad, pwl, ste"):
        quant.get_octav_qconfig("x86", gradient="sgd")
    with pytest.raises(ValueError, match="unknown QAT method 'lsq'; valid choices: ste, ewgs, octav"):
        quant.get_method_qconfig("lsq", "x86")


def test_octav_fake_quant_dynamic_static_and_state_dict():
    dyn = quant.get_octav_qconfig("x86").activation()  # x86 activations: 7 bits (0..127), EMA weight 0.01
    x1, x2 = torch.relu(torch.randn(64, 8)), 4 * torch.relu(torch.randn(64, 8))
    s1 = quant.octav_clip(x1, 7, unsigned=True)
    s2 = quant.octav_clip(x2, 7, unsigned=True, init=s1)  # each batch starts from the stored range
    dyn(x1)
    torch.testing.assert_close(dyn.scale, s1 / 127, rtol=1e-6, atol=0)
    y = dyn(x2)  # training: clipped with this batch's own OCTAV range ...
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x2, float(s2 / 127), 0, 0, 127))
    ema = s1 + 0.01 * (s2 - s1)  # ... while the buffers keep the running range for eval/convert
    torch.testing.assert_close(dyn.activation_post_process.max_val, ema)
    torch.testing.assert_close(dyn.scale, dyn.calculate_qparams()[0])
    dyn.eval()
    dyn.disable_observer()
    torch.testing.assert_close(dyn(x2), torch.fake_quantize_per_tensor_affine(x2, float(dyn.scale), 0, 0, 127))

    static = quant.get_octav_qconfig("qnnpack", dynamic=False, calib_batches=2).weight()
    w1, w2 = torch.randn(6, 5), torch.randn(6, 5)
    static(w1)
    static(w2)
    frozen = static.scale.clone()
    assert int(static.observer_enabled) == 0
    # qnnpack weights are per channel: one clip per output row
    torch.testing.assert_close(frozen, (quant.octav_clip(w1, 8, ch_axis=0) + quant.octav_clip(w2, 8, ch_axis=0)) / 2 / 127.5,
                               rtol=1e-4, atol=0)
    static(10 * w1)
    assert torch.equal(static.scale, frozen)

    per_channel = quant.get_octav_qconfig("x86").weight()
    per_channel(torch.randn(6, 5))
    fresh = quant.get_octav_qconfig("x86").weight()
    fresh.load_state_dict(per_channel.state_dict())
    assert fresh.scale.shape == (6,) and torch.equal(fresh.scale, per_channel.scale)
    fresh.disable_observer()
    per_channel.disable_observer()
    w = torch.randn(6, 5)
    assert torch.equal(fresh(w), per_channel(w))


# ---------------------------------------------------------------------------------------------
# EWGS


class _PaperRound(torch.autograd.Function):
    """x_q = round(n x_n) / n with the EWGS backward of Eq. 4, as the paper writes it."""

    @staticmethod
    def forward(ctx, xn, n, delta):
        xq = torch.round(n * xn) / n
        ctx.save_for_backward(xn, xq)
        ctx.delta = delta
        return xq

    @staticmethod
    def backward(ctx, g):
        xn, xq = ctx.saved_tensors
        return g * (1 + ctx.delta * torch.sign(g) * (xn - xq)), None, None


def _paper_quantizer(x, lower, upper, n, delta):
    """Eqs. 1-3 with autograd: x_n = clip((x - l) / (u - l), 0, 1), Q = l + (u - l) x_q."""
    xn = torch.clamp((x - lower) / (upper - lower), 0, 1)
    return lower + (upper - lower) * _PaperRound.apply(xn, n, delta)


def _ewgs(qscheme=torch.per_tensor_affine, qrange=(0, 15), per_channel=False) -> quant.EWGSFakeQuantize:
    dtype = torch.quint8 if qrange[0] >= 0 else torch.qint8
    if per_channel:
        return quant.EWGSFakeQuantize(observer=torch.ao.quantization.PerChannelMinMaxObserver, quant_min=qrange[0],
                                      quant_max=qrange[1], dtype=dtype, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return quant.EWGSFakeQuantize(quant_min=qrange[0], quant_max=qrange[1], dtype=dtype, qscheme=qscheme)


def test_ewgs_backward_matches_eq4_by_hand():
    fq = _ewgs()  # activations, 4 bits: 15 steps
    fq.initialized.fill_(1)
    with torch.no_grad():
        fq.lower.fill_(0.0)
        fq.upper.fill_(1.5)  # step 0.1
    fq.delta.fill_(2.0)
    x = torch.tensor([0.04, 0.26, 0.57, 1.62, -0.3, 1.44], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 0.5, 1.0, 1.0, -1.0])
    y = fq(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.3, 0.6, 1.5, 0.0, 1.4]))
    y.backward(g)
    expected = []
    for xi, gi in zip(x.tolist(), g.tolist()):
        xn = min(max(xi / 1.5, 0.0), 1.0)
        xq = round(15 * xn) / 15
        inside = 0.0 <= xi / 1.5 <= 1.0
        expected.append(gi * (1 + 2.0 * math.copysign(1.0, gi) * (xn - xq)) if inside else 0.0)
    torch.testing.assert_close(x.grad, torch.tensor(expected))
    assert x.grad[0].item() == pytest.approx(1 + 2 * 0.4 / 15, rel=1e-5)  # scaled up: 0.4 steps past its level


@pytest.mark.parametrize("delta", [0.0, 3.0])
def test_ewgs_interval_gradients_match_the_paper_quantizer(delta):
    # no element within half a step outside [l, u], where torch's mask (kept, so that delta = 0 is
    # its STE) is wider than the clip of Eq. 1
    x = torch.tensor([0.04, 0.26, 0.57, 1.62, -0.5, 1.44, 0.97, 3.9])
    g = torch.tensor([1.0, -2.0, 0.5, 1.0, 1.0, -1.0, 0.3, 2.0])
    # affine activations: learn l and u (l = -0.25 and u = 3.5 put 0 on a level: no snapping)
    fq = _ewgs()
    fq.initialized.fill_(1)
    with torch.no_grad():
        fq.lower.fill_(-0.25)
        fq.upper.fill_(3.5)
    fq.delta.fill_(delta)
    xa = x.clone().requires_grad_()
    fq(xa).backward(g)
    xr, lr, ur = x.clone().requires_grad_(), torch.tensor(-0.25, requires_grad=True), torch.tensor(3.5, requires_grad=True)
    _paper_quantizer(xr, lr, ur, 15, delta).backward(g)
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(fq.lower.grad, lr.grad.reshape(1))
    torch.testing.assert_close(fq.upper.grad, ur.grad.reshape(1))
    # symmetric weights: only u is learned, l = u qmin / qmax
    wq = _ewgs(torch.per_tensor_symmetric, (-8, 7))
    wq.initialized.fill_(1)
    with torch.no_grad():
        wq.upper.fill_(0.7)
    wq.delta.fill_(delta)
    xw = (x - 0.5).clone().requires_grad_()
    wq(xw).backward(g)
    xr, ur = (x - 0.5).clone().requires_grad_(), torch.tensor(0.7, requires_grad=True)
    _paper_quantizer(xr, ur * (-8 / 7), ur, 15, delta).backward(g)
    torch.testing.assert_close(xw.grad, xr.grad)
    torch.testing.assert_close(wq.upper.grad, ur.grad.reshape(1))


def test_ewgs_at_delta_zero_is_torch_ste():
    x = torch.randn(4, 3, 5, 5)
    g = torch.randn_like(x)
    for fq, reference in (
        (_ewgs(), lambda t, s, z: torch.fake_quantize_per_tensor_affine(t, float(s), int(z), 0, 15)),
        (_ewgs(torch.per_tensor_symmetric, (-128, 127)),
         lambda t, s, z: torch.fake_quantize_per_tensor_affine(t, float(s), int(z), -128, 127)),
        (_ewgs(qrange=(-8, 7), per_channel=True),
         lambda t, s, z: torch.fake_quantize_per_channel_affine(t, s, z, 0, -8, 7)),
    ):
        mine = x.clone().requires_grad_()
        out = fq(mine)  # first pass sets the interval
        assert float(fq.delta) == 0.0
        out.backward(g)
        ref = x.clone().requires_grad_()
        expected = reference(ref, fq.scale, fq.zero_point)
        expected.backward(g)
        assert torch.equal(out.detach(), expected.detach())
        assert torch.equal(mine.grad, ref.grad)
    assert fq.upper.shape == (4,)  # per-channel: one u per output channel, 3 sigma of that channel
    torch.testing.assert_close(fq.upper.detach(), 3 * x.reshape(4, -1).std(dim=1))


class _Quadratic(nn.Module):
    """L = 0.5 sum(a Q^2) with Q the fake-quantized weight: H_Q = diag(a), exactly."""

    def __init__(self, w: torch.Tensor, per_channel: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(w)
        self.fq = _ewgs(torch.per_tensor_symmetric, (-8, 7), per_channel=per_channel)

    def forward(self) -> torch.Tensor:
        return self.fq(self.w)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ewgs_delta_from_hutchinson_trace_on_a_quadratic(per_channel):
    w = torch.randn(3, 6)
    a = torch.rand(3, 6) + 0.5
    model = _Quadratic(w, per_channel)
    with pytest.raises(ValueError, match="have no interval yet"):
        quant.update_ewgs_deltas(model, lambda: 0.5 * (a * model() ** 2).sum())
    q = model().detach()
    rng = torch.get_rng_state()
    deltas = quant.update_ewgs_deltas(model, lambda: 0.5 * (a * model() ** 2).sum())
    assert torch.equal(torch.get_rng_state(), rng)
    # Eq. 10 in x_q units: x_q = (Q - l) / (u - l), so H_xq = (u - l)^2 a and g_xq = (u - l) a Q.
    # Rademacher v has v_i^2 = 1: the trace estimate of a diagonal Hessian is exact.
    width = (model.fq.scale * 15).reshape(-1, 1).expand(3, 6).double()
    trace = float((width ** 2 * a.double()).mean())
    sigma = statistics.stdev((width * a.double() * q.double()).reshape(-1).tolist())
    assert deltas == {"fq": pytest.approx(trace / (3 * sigma), rel=1e-5)}
    assert float(model.fq.delta) == pytest.approx(trace / (3 * sigma), rel=1e-5)
    # a concave loss has a negative trace: delta is clamped at 0 (Sec. 3.2)
    assert quant.update_ewgs_deltas(model, lambda: -0.5 * (a * model() ** 2).sum()) == {"fq": 0.0}


def test_ewgs_model_state_dict_round_trip_and_bounds_learn():
    torch.manual_seed(0)
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    quant.prepare_qat(model, "x86", qconfig=quant.get_ewgs_qconfig("x86", weight_quant_range=(-8, 7)))
    bounds = quant.ewgs_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)  # the bounds are parameters of the model
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = [b.detach().clone() for b in bounds]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert any(b.grad is not None and b.grad.abs().sum() > 0 for b in bounds)
    assert any(b.shape != b0.shape or not torch.equal(b.detach(), b0) for b, b0 in zip(bounds, before))
    quant.update_ewgs_deltas(model, lambda: F.cross_entropy(model(x), y))
    assert any(float(m.delta) > 0 for m in model.modules() if isinstance(m, quant.EWGSFakeQuantize))
    fresh = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    quant.prepare_qat(fresh, "x86", qconfig=quant.get_ewgs_qconfig("x86", weight_quant_range=(-8, 7)))
    fresh.load_state_dict(model.state_dict(), strict=True)  # per-channel bounds take the saved size
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------------------------------
# INT8 conversion after QAT with each method


def _train_steps(model: nn.Module, steps: int = 2, talr: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    bounds = quant.ewgs_parameters(model)  # interval bounds: a much smaller LR, as in the recipe
    ids = {id(p) for p in bounds}
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in ids]},
                           {"params": bounds, "lr": 1e-4}], lr=0.01, momentum=0.9)
    if talr:
        opt = TransitionRateScheduler(opt, target=0.01, schedule="constant", model=model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return x, y


def _check_int8_matches_fake_quant(model: nn.Module, backend: str, wrange: tuple[int, int], x: torch.Tensor) -> None:
    """The INT8 model stores what the fake quantizers simulated: integer weights (in the
    simulated range), weight scales and activation qparams; and computes the same logits."""
    quant.disable_observer(model)
    model.eval()
    with torch.no_grad():
        fake = model(x)  # also refreshes the methods' quantizers' scales from the trained state
    int8 = quant.convert(model, backend)
    assert quant.is_quantized_model(int8)
    checked = 0
    for name, qm in int8.named_modules():
        weight = getattr(qm, "weight", None)
        if not callable(weight) or not hasattr(qm, "scale"):
            continue
        qat = model.get_submodule(name)
        w = weight()
        ints = w.int_repr().to(torch.int32)
        assert wrange[0] <= int(ints.min()) and int(ints.max()) <= wrange[1], name
        fq = qat.weight_fake_quant
        converted_scale, converted_zp = fq.calculate_qparams()  # what conversion uses ...
        torch.testing.assert_close(fq.scale, converted_scale)  # ... is the grid the forward pass used
        assert torch.equal(fq.zero_point, converted_zp.to(fq.zero_point))
        levels = quant.weight_levels(qat).to(torch.int32)
        assert (ints - levels).abs().max() <= 1 and (ints != levels).float().mean() < 1e-3, name
        scales = w.q_per_channel_scales() if w.qscheme() == torch.per_channel_affine else torch.tensor([w.q_scale()])
        torch.testing.assert_close(scales.float(), converted_scale.reshape(-1).float())
        assert qm.scale == pytest.approx(float(qat.activation_post_process.calculate_qparams()[0]), rel=1e-6), name
        checked += 1
    assert checked > 10
    with torch.no_grad():
        real = int8(x)
    # the same computation up to rounding ties in the integer kernels (a flipped level is a big
    # step at 4 bits); a wrong scale or range would be off everywhere
    assert (fake - real).abs().mean() <= 0.25 * fake.abs().mean() + 1e-6


def _unfused_ste_qconfig(backend: str, wrange, arange) -> torch.ao.quantization.QConfig:
    """torch's default STE qconfig without the fused kernel. The fused FusedMovingAvgObsFakeQuantize
    simulates other qparams than it converts with (a scale about 0.4% smaller, and an
    affine zero point for per-channel "symmetric" channels whose weights are all negative), so
    only the unfused form can be compared exactly with its INT8 model."""
    ao = torch.ao.quantization
    wmin, wmax = wrange or (-128, 127)
    amin, amax = arange or (0, 127 if backend == "x86" else 255)
    per_channel = backend == "x86"
    weight = ao.FakeQuantize.with_args(
        observer=ao.MovingAveragePerChannelMinMaxObserver if per_channel else ao.MovingAverageMinMaxObserver,
        quant_min=wmin, quant_max=wmax, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
    act = ao.FakeQuantize.with_args(observer=ao.MovingAverageMinMaxObserver, quant_min=amin, quant_max=amax,
                                    dtype=torch.quint8)
    return ao.QConfig(activation=act, weight=weight)


@pytest.mark.parametrize("bits", sorted(BITS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["ewgs", "octav", "talr"])
def test_qat_with_method_converts_to_int8(method, backend, bits):
    """QAT with EWGS, OCTAV/MAD or STE + transition-rate scheduling, W8A8 or W4A4, then INT8."""
    wrange, arange = BITS[bits]
    torch.manual_seed(0)
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    if method == "talr":
        qconfig = _unfused_ste_qconfig(backend, wrange, arange)
    else:
        qconfig = quant.get_method_qconfig(method, backend, weight_quant_range=wrange, act_quant_range=arange)
    quant.prepare_qat(model, backend, qconfig=qconfig)
    x, _ = _train_steps(model, talr=method == "talr")
    kind = {"ewgs": quant.EWGSFakeQuantize, "octav": quant.OctavFakeQuantize}.get(method)
    if kind is not None:
        assert isinstance(model.conv1.conv[0].weight_fake_quant, kind)
    else:  # TALR froze the weight grids at the first step
        assert int(model.conv1.conv[0].weight_fake_quant.observer_enabled) == 0
    _check_int8_matches_fake_quant(model, backend, wrange or (-128, 127), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_octav_observer_calibrates_post_training_quantization(backend):
    torch.manual_seed(0)
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():  # BN statistics of the data, so that activations keep their scale
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for x in batches:
            model(x)
        model.eval()
        ref = model(batches[0])
    with torch.no_grad():
        default_error = (quant.quantize_ptq(model, batches, backend)(batches[0]) - ref).abs().mean()
    observed = quant.prepare_ptq(model, backend, qconfig=quant.get_octav_qconfig(backend, qat=False))
    quant.calibrate(observed, batches)
    obs = observed.conv1.conv[0].activation_post_process
    # torch's eager PTQ runs the observer of a fused Conv-ReLU twice per batch (as a child of the
    # Sequential and as its hook), on the same tensor: the running mean is unaffected
    assert isinstance(obs, quant.OctavObserver) and int(obs.num_batches) in (2, 4)
    int8 = quant.convert(observed, backend)
    with torch.no_grad():
        out = int8(batches[0])
    # an untrained 8-bit model is far from its float twin either way; the MSE-optimal clipping
    # does about as well as the default (histogram / min-max) observers, a wrong range far worse
    assert (out - ref).abs().mean() <= 1.25 * default_error


# ---------------------------------------------------------------------------------------------
# FoldTracker: fixed weight grids of Conv-BN layers stay fixed in units of the unfolded weight


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.relu(self.bn(self.conv(self.quant(x)))))

    def fuse_model(self, is_qat=None) -> None:
        quant.fuse_modules(self, [["conv", "bn", "relu"]], is_qat=bool(is_qat))


def _frozen_conv_bn(qconfig=None) -> nn.Module:
    torch.manual_seed(0)
    model = quant.prepare_qat(_ConvBn(), "x86", weight_quant_range=(-8, 7), act_quant_range=(0, 15), qconfig=qconfig)
    model(torch.randn(4, 3, 8, 8))
    quant.freeze_weight_quantizer(model.conv)
    return model


def _move_bn(model: nn.Module) -> None:
    """Change BN's running variance (3x larger inputs) and gamma, as training does; weights stay."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        model(3 * torch.randn(4, 3, 8, 8, generator=gen))
    with torch.no_grad():
        model.conv.bn.weight.mul_(torch.linspace(0.5, 1.5, 6))


@pytest.mark.parametrize("method", ["ste", "octav", "ewgs"])
def test_fold_tracker_keeps_the_weight_levels_while_bn_moves(method):
    """Frozen in folded units (a disabled observer, frozen EWGS bounds), the grid moves against the
    weights whenever BN does; the tracker keeps the integer levels of unchanged weights."""
    qconfig = None if method == "ste" else quant.get_method_qconfig(method, "x86", weight_quant_range=(-8, 7),
                                                                       act_quant_range=(0, 15))
    plain, tracked = _frozen_conv_bn(qconfig), _frozen_conv_bn(qconfig)
    tracker = quant.FoldTracker(tracked)
    assert tracker.modules == [tracked.conv]
    assert tracker.update() == 0  # the first call only takes the reference
    levels = quant.weight_levels(tracked.conv)
    for m in (plain, tracked):
        _move_bn(m)
    assert tracker.update() == 1
    for m in (plain, tracked):
        m.eval()  # the next forward pass applies the grid (torch's fused one recomputes it); BN stays
        m(torch.randn(2, 3, 8, 8))
        m.train()
    assert not torch.equal(quant.weight_levels(plain.conv), levels)
    assert torch.equal(quant.weight_levels(tracked.conv), levels)
    # an exact resume: a new tracker with the saved references moves the grid as the old one would
    twin = _frozen_conv_bn(qconfig)
    twin.load_state_dict(tracked.state_dict())
    resumed = quant.FoldTracker(twin)
    resumed.load_state_dict(tracker.state_dict())
    for m in (tracked, twin):
        _move_bn(m)
    tracker.update(), resumed.update()
    for a, b in zip(tracked.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_fold_tracker_leaves_observed_grids_and_checks_its_state():
    model = _frozen_conv_bn()
    quant.enable_observer(model)  # an observing quantizer re-derives its grid itself
    tracker = quant.FoldTracker(model)
    tracker.update()
    _move_bn(model)
    scale = model.conv.weight_fake_quant.scale.clone()
    assert tracker.update() == 0 and torch.equal(model.conv.weight_fake_quant.scale, scale)
    with pytest.raises(ValueError, match="FoldTracker state has 2 layer factors, this tracker tracks 1 layers"):
        tracker.load_state_dict({"folds": [None, None]})
    with pytest.raises(ValueError, match="layer 0 has 3 factors, the layer has 6 channels"):
        tracker.load_state_dict({"folds": [torch.ones(3)]})
    with pytest.raises(ValueError, match="pass either model or modules"):
        quant.FoldTracker()


# ---------------------------------------------------------------------------------------------
# EWGS delta over several batches, per quantizer (issue 20)


class _Coupled(nn.Module):
    """Two EWGS weight quantizers; the loss couples their outputs element-wise, so the Hessian has
    diagonal blocks diag(a1), diag(a2) and an off-diagonal block diag(c)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(64, generator=gen))
        self.w2 = nn.Parameter(torch.randn(64, generator=gen))
        self.fq1 = _ewgs(torch.per_tensor_symmetric, (-8, 7))
        self.fq2 = _ewgs(torch.per_tensor_symmetric, (-8, 7))
        self.a1, self.a2 = torch.rand(64, generator=gen) + 0.5, torch.rand(64, generator=gen) + 0.5
        self.c = torch.randn(64, generator=gen) * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fq1(self.w1) * x, self.fq2(self.w2) * x])

    def loss(self, out: torch.Tensor, _target: object = None) -> torch.Tensor:
        q1, q2 = out
        return 0.5 * (self.a1 * q1**2).sum() + 0.5 * (self.a2 * q2**2).sum() + (self.c * q1 * q2).sum()


def test_ewgs_per_quantizer_trace_is_exact_where_all_at_once_has_cross_terms():
    model = _Coupled()
    one = torch.ones(())
    model(one)  # sets the intervals
    exact = {name: float((fq.interval_width(torch.zeros(1)).double() ** 2 * a.double()).mean())
             for name, fq, a in (("fq1", model.fq1, model.a1), ("fq2", model.fq2, model.a2))}
    closure = lambda: model.loss(model(one))  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    per = quant.ewgs_trace_estimates(model, [closure], samples=1, per_quantizer=True, generator=gen)
    assert {n: e.mean_trace for n, e in per.items()} == pytest.approx(exact, rel=1e-6)  # float32
    joint = quant.ewgs_trace_estimates(model, [closure], samples=1, per_quantizer=False, generator=gen)
    assert any(abs(joint[n].mean_trace - exact[n]) > 0.05 * exact[n] for n in exact)  # one draw: cross terms
    many = quant.ewgs_trace_estimates(model, [closure] * 4, samples=100, per_quantizer=False, generator=gen)
    assert {n: e.mean_trace for n, e in many.items()} == pytest.approx(exact, rel=0.1)  # they vanish on average


def test_estimate_ewgs_deltas_averages_batches_and_sets_eq10():
    model = _Coupled()
    model(torch.ones(()))
    batches = [(torch.tensor(0.5), None), (torch.tensor(2.0), None), (torch.tensor(9.0), None)]
    deltas = quant.estimate_ewgs_deltas(model, iter(batches[:2]), model.loss, samples=2)
    estimates = quant.ewgs_trace_estimates(
        model, [lambda x=x: model.loss(model(x)) for x, _ in batches[:2]], samples=2)
    assert deltas == pytest.approx({n: e.delta for n, e in estimates.items()})
    assert float(model.fq1.delta) == pytest.approx(deltas["fq1"]) and deltas["fq1"] > 0
    # the trace scales with x**2 per batch: the average is over both batches, not the last one
    first = quant.ewgs_trace_estimates(model, [lambda: model.loss(model(torch.tensor(0.5)))], samples=2)
    assert estimates["fq1"].mean_trace == pytest.approx(first["fq1"].mean_trace * (0.25 + 4.0) / 2 / 0.25)
    with pytest.raises(ValueError, match="closures is empty"):
        quant.estimate_ewgs_deltas(model, iter([]), model.loss)
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        quant.estimate_ewgs_deltas(model, iter(batches), model.loss, samples=0)


# ---------------------------------------------------------------------------------------------
# OCTAV max-scaling (the paper's baseline)


def test_octav_max_scaling_clips_nothing():
    x = torch.tensor([[-3.0, 1.0, 0.5], [0.2, -0.1, 2.0]])
    obs = quant.OctavObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7,
                              clipping="max")
    low, high = obs.batch_range(x)
    assert high.tolist() == [3.0, 2.0] and low.tolist() == [-3.0, -2.0]
    act = quant.OctavObserver(quant_min=0, quant_max=15, clipping="max")
    assert [float(v) for v in act.batch_range(torch.tensor([0.5, 4.0, 1.0]))] == [0.0, 4.0]
    octav = quant.OctavObserver(quant_min=0, quant_max=15)
    assert float(octav.batch_range(torch.tensor([0.5, 4.0, 1.0] * 10 + [40.0]))[1]) < 40.0
    qconfig = quant.get_octav_qconfig("x86", clipping="max", weight_quant_range=(-8, 7))
    assert qconfig.weight().activation_post_process.clipping == "max"
    with pytest.raises(ValueError, match="unknown clipping 'min'; valid choices: octav, max"):
        quant.OctavObserver(clipping="min")


# ---------------------------------------------------------------------------------------------
# keep_8bit_ends


def _ranges_of(model: nn.Module, name: str) -> tuple[int, int]:
    fq = model.get_submodule(name)
    obs = getattr(fq, "activation_post_process", fq)
    return int(obs.quant_min), int(obs.quant_max)


@pytest.mark.parametrize("method", ["ste", "ewgs", "octav"])
def test_keep_8bit_ends_first_last_8bit_middle_4bit_and_int8(method):
    model = frostnet.get_model("frostnet_small_0_35", num_classes=10)
    quant.prepare_qat(model, "x86", qconfig=quant.get_method_qconfig(method, "x86", weight_quant_range=(-8, 7),
                                                                     act_quant_range=(0, 15)))
    replaced = quant.keep_8bit_ends(model, quant.get_method_qconfig(method, "x86"))
    layers = [n for n, _ in quant.weight_quantized_modules(model)]
    first, middle, last = layers[0], layers[len(layers) // 2], layers[-1]
    assert replaced == ["quant.activation_post_process", f"{first}.weight_fake_quant",
                        "last_layer.conv.0.activation_post_process", f"{last}.weight_fake_quant",
                        f"{last}.activation_post_process"]
    for name in replaced:
        assert _ranges_of(model, name) in ((-128, 127), (0, 127), (0, 255))
    assert _ranges_of(model, f"{middle}.weight_fake_quant") == (-8, 7)
    assert _ranges_of(model, f"{middle}.activation_post_process") == (0, 15)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    model.eval()
    int8 = quant.convert(model, "x86")
    assert quant.is_quantized_model(int8)
    assert int8(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_keep_8bit_ends_needs_a_prepared_model():
    with pytest.raises(ValueError, match="has 0 weight-quantized layers; keep_8bit_ends needs a model prepared"):
        quant.keep_8bit_ends(frostnet.get_model("frostnet_small_0_35", num_classes=10), quant.get_qconfig("x86", qat=True))
    with pytest.raises(TypeError, match="qconfig must be a torch.ao.quantization.QConfig, got str"):
        quant.keep_8bit_ends(nn.Linear(2, 2), "x86")
