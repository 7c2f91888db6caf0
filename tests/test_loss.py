"""The objective (SPEC section 5): correlation coefficients against scipy and closed forms,
every loss term recomputed by hand, and which networks receive gradients."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from conftest import lin_ccc, train_opt
from pix2pixCC_Networks import Discriminator, Generator, Loss, correlation, weights_init
from pix2pixCC_Utils import Precision


def correlated(shape, seed, offset=0.0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    f = 0.8 * t + noise * torch.randn(shape, generator=g, dtype=torch.float64) + offset
    return t, f


# ----------------------------------------------------------------------------------------
# correlation
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('ccc', [True, False])
def test_correlation_per_sample_and_channel(ccc):
    t, f = correlated((2, 2, 16, 24), seed=1)
    f[0, 1] += 0.7  # different mean offsets per sample and channel
    f[1, 0] *= 1.9
    cc = correlation(t, f, ccc=ccc, eps=1e-8)
    assert cc.shape == (2, 2) and cc.dtype == torch.float64
    for b in range(2):
        for c in range(2):
            tb, fb = t[b, c].numpy(), f[b, c].numpy()
            expected = lin_ccc(tb, fb) if ccc else pearsonr(tb.ravel(), fb.ravel())[0]
            assert float(cc[b, c]) == pytest.approx(expected, abs=1e-6)
    # The entries really differ, so a pooled or swapped computation would show.
    assert len({round(float(v), 4) for v in cc.flatten()}) == 4


def test_ccc_closed_form_with_sigmas():
    t, f = correlated((1, 1, 20, 20), seed=2, offset=0.3)
    tn, fn = t.numpy().ravel(), f.numpy().ravel()
    rho = pearsonr(tn, fn)[0]
    expected = 2 * rho * tn.std() * fn.std() / (tn.var() + fn.var() + (tn.mean() - fn.mean()) ** 2)
    assert float(correlation(t, f, ccc=True)[0, 0]) == pytest.approx(expected, abs=1e-6)
    assert float(correlation(t, f, ccc=True)[0, 0]) < rho - 0.01  # offset lowers CCC only


def test_correlation_limits_and_shapes():
    t = torch.randn(3, 8, 8, dtype=torch.float64)
    assert correlation(t, t).shape == (3,)
    torch.testing.assert_close(correlation(t, t), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(correlation(t, -t, ccc=False), -torch.ones(3, dtype=torch.float64))
    # Pearson ignores scale and offset; CCC does not.
    assert float(correlation(t[0], 3 * t[0] + 2, ccc=False)) == pytest.approx(1, abs=1e-6)
    assert float(correlation(t[0], 3 * t[0] + 2, ccc=True)) < 0.5
    assert correlation(t[0], t[0]).shape == (1,)
    # Constant data: eps keeps the value finite.
    zero = torch.zeros(1, 1, 8, 8)
    assert torch.isfinite(correlation(zero, zero, eps=1e-8)).all()
    assert torch.isfinite(correlation(zero, zero, ccc=False, eps=1e-8)).all()


def test_correlation_of_half_precision_inputs_is_float32():
    t, f = correlated((1, 1, 16, 16), seed=3)
    cc = correlation(t.to(torch.bfloat16), f.to(torch.bfloat16))
    assert cc.dtype == torch.float32
    expected = lin_ccc(t.to(torch.bfloat16).double().numpy(), f.to(torch.bfloat16).double().numpy())
    assert float(cc[0, 0]) == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------------------
# The full objective, recomputed from D's outputs
# ----------------------------------------------------------------------------------------

def pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)


def hand_losses(opt, D, input, target, fake):
    """Every term of SPEC section 5 from the discriminator scales called one by one."""
    n_in, n_out = (2, 1)  # input_ch 1, target_ch 2 -> input repeated twice
    real_pair = torch.cat([input] * n_in + [target] * n_out, 1)
    fake_pair = torch.cat([input] * n_in + [fake] * n_out, 1)
    loss_D = LSGAN = FM = 0.0
    with torch.no_grad():
        for s in range(opt.n_D):
            if s > 0:
                real_pair, fake_pair = pool(real_pair), pool(fake_pair)
            scale = getattr(D, f'Scale_{s}')
            real, fake_out = scale(real_pair), scale(fake_pair)
            loss_D += 0.5 * (float(((real[-1] - 1) ** 2).mean()) +
                             float((fake_out[-1] ** 2).mean()))
            LSGAN += 0.5 * opt.lambda_LSGAN * float(((fake_out[-1] - 1) ** 2).mean())
            FM += sum(float((fj - rj).abs().mean()) for fj, rj in zip(fake_out, real))
    FM_per_scale = FM  # summed over scales
    FM *= opt.lambda_FM / opt.n_D
    t, f = target.detach().double(), fake.detach().double()
    ccs = []
    for i in range(opt.n_CC):
        if i > 0:
            t, f = pool(t), pool(f)
        values = [lin_ccc(t[b, c].numpy(), f[b, c].numpy())
                  for b in range(t.shape[0]) for c in range(t.shape[1])]
        ccs.append(np.mean(values))
    G_CC = opt.lambda_CC / opt.n_CC * sum(1 - cc for cc in ccs)
    return dict(D=loss_D, G_LSGAN=LSGAN, G_FM=FM, G_CC=G_CC, CC=ccs[0],
                G=LSGAN + FM + G_CC, FM_sum=FM_per_scale)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    opt = train_opt('--n_D', '2', '--n_CC', '3', '--input_ch', '1', '--target_ch', '2',
                    '--lambda_LSGAN', '1.5', '--lambda_FM', '7', '--lambda_CC', '3')
    G = Generator(opt).apply(weights_init)
    D = Discriminator(opt).apply(weights_init)
    input = torch.randn(2, 1, 64, 64)
    target = torch.cat([torch.tanh(input), -0.5 * input], 1)
    target[1] += 0.5  # the two samples have different means
    return opt, G, D, input, target


def test_loss_terms_match_hand_computation(setup):
    opt, G, D, input, target = setup
    criterion = Loss(opt)
    loss_D, loss_G, target_out, fake = criterion(D, G, input, target)
    assert torch.equal(target_out, target)
    assert fake.shape == target.shape
    torch.testing.assert_close(fake.detach(), G(input).detach())
    expected = hand_losses(opt, D, input, target, fake)
    terms = {k: float(v) for k, v in criterion.terms.items()}
    assert set(terms) == {'D', 'G', 'G_LSGAN', 'G_FM', 'G_CC', 'CC'}
    assert all(not v.requires_grad and v.dim() == 0 for v in criterion.terms.values())
    for name in ('D', 'G_LSGAN', 'G_FM', 'G_CC', 'CC', 'G'):
        assert terms[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert float(loss_D.detach()) == pytest.approx(expected['D'], rel=1e-5)
    assert float(loss_G.detach()) == pytest.approx(expected['G'], rel=1e-5)
    # The reference's n_D > 1 feature matching (scale 0 counted twice) would differ.
    with torch.no_grad():
        fm = [sum(float((fj - rj).abs().mean()) for fj, rj in zip(f_s, r_s))
              for f_s, r_s in zip(D(torch.cat([input, input, fake], 1)),
                                  D(torch.cat([input, input, target], 1)))]
    reference_fm = opt.lambda_FM / 2 * (fm[0] + (fm[0] + fm[1]))
    assert abs(reference_fm - terms['G_FM']) > 1e-3 * terms['G_FM']


def test_cc_is_averaged_per_sample_not_pooled_over_the_batch(setup):
    # Fake data with the right per-image means but unrelated structure: a batch-pooled CC
    # (the reference) is high, the per-sample CC ([fix]) is near 0.
    opt, _, D, _, _ = setup
    g = torch.Generator().manual_seed(5)
    input = torch.randn(2, 1, 64, 64, generator=g)
    input[1] += 5
    target = input.mean((2, 3), keepdim=True) + torch.randn(2, 2, 64, 64, generator=g)
    G = torch.nn.Conv2d(1, 2, 1)  # any module works as G: here fake = input in both channels
    with torch.no_grad():
        G.weight.fill_(1.0)
        G.bias.zero_()
    criterion = Loss(opt)
    _, _, _, fake = criterion(D, G, input, target)
    per_sample = np.mean([lin_ccc(target[b, c], fake[b, c].detach())
                          for b in range(2) for c in range(2)])
    assert float(criterion.terms['CC']) == pytest.approx(per_sample, abs=1e-5)
    assert abs(per_sample) < 0.1
    pooled = lin_ccc(target.numpy(), fake.detach().numpy())
    assert pooled > 0.5


def test_n_cc_zero_gives_no_cc_loss(setup):
    opt, G, D, input, target = setup
    opt.n_CC = 0
    criterion = Loss(opt)
    _, loss_G, _, _ = criterion(D, G, input, target)
    assert float(criterion.terms['G_CC']) == 0
    assert float(loss_G.detach()) == pytest.approx(float(criterion.terms['G_LSGAN'] +
                                                criterion.terms['G_FM']), rel=1e-6)


def test_generator_step_leaves_no_gradient_on_D_and_D_step_none_on_G(setup):
    opt, G, D, input, target = setup
    loss_D, loss_G, _, _ = Loss(opt)(D, G, input, target)
    assert all(p.requires_grad for p in D.parameters())  # unfrozen after the call
    loss_G.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in D.parameters())
    G_grads = {n: p.grad.clone() for n, p in G.named_parameters()}
    assert all(g is not None for g in G_grads.values())
    assert sum(float(g.abs().sum()) for g in G_grads.values()) > 0
    loss_D.backward()  # after the G backward, as in the training loop
    D_grads = [p.grad for p in D.parameters()]
    assert all(g is not None for g in D_grads)
    assert all(float(g.abs().sum()) > 0 for g in D_grads)
    for n, p in G.named_parameters():  # the fake pair is detached for D's loss
        assert torch.equal(p.grad, G_grads[n]), n


def test_d_loss_pushes_real_up_and_fake_down(setup):
    opt, G, D, input, target = setup
    criterion = Loss(opt)
    D_optim = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    first = None
    for _ in range(15):
        loss_D, _, _, _ = criterion(D, G, input, target)
        first = float(loss_D.detach()) if first is None else first
        D_optim.zero_grad()
        loss_D.backward()
        D_optim.step()
    assert float(criterion.terms['D']) < first


def test_mixed_precision_step_on_cpu(setup):
    opt, G, D, input, target = setup
    opt.data_type, opt.eps = 16, 1e-4
    precision = Precision(opt, torch.device('cpu'))
    assert precision.enabled and precision.dtype == torch.bfloat16
    criterion = Loss(opt)
    G_optim = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    D_optim = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    with precision.autocast():
        loss_D, loss_G, _, fake = criterion(D, G, input, target)
    assert fake.dtype == torch.bfloat16  # autocast really acted
    assert criterion.terms['CC'].dtype == torch.float32
    assert criterion.terms['G_CC'].dtype == torch.float32
    # CC in float32 from the bfloat16 fake (a bfloat16 computation would be ~1e-2 off).
    expected = np.mean([lin_ccc(target[b, c], fake[b, c].detach().double())
                        for b in range(2) for c in range(2)])
    assert float(criterion.terms['CC']) == pytest.approx(expected, abs=2e-5)
    assert all(torch.isfinite(v) for v in criterion.terms.values())
    G_optim.zero_grad()
    precision.scaler.scale(loss_G).backward()
    precision.scaler.step(G_optim)
    D_optim.zero_grad()
    precision.scaler.scale(loss_D).backward()
    precision.scaler.step(D_optim)
    precision.scaler.update()
    for p in list(G.parameters()) + list(D.parameters()):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
