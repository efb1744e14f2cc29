"""Every loss against an independent float64 reference written with explicit loops.

The references below use only scalar arithmetic on the rows (no code from
``clipstudy.core.losses``); autograd through them gives the reference gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from clipstudy.core.losses import LOSSES, PairLoss, available_losses, make_loss, register_loss

B, D = 6, 5
ALL = ["clip", "sogclr", "isogclr", "cyclip", "vicreg", "onlineclr", "siglip"]


# ------------------------------------------------------------ references
def unit_rows(x):
    return [x[i] / torch.sqrt((x[i] * x[i]).sum()) for i in range(x.shape[0])]


def dot(a, b):
    return (a * b).sum()


def similarity(img, txt):
    u, v = unit_rows(img), unit_rows(txt)
    return u, v, [[dot(u[i], v[j]) for j in range(len(v))] for i in range(len(u))]


def log_mean_exp(values):
    return torch.log(sum(torch.exp(z) for z in values) / len(values))


def ref_clip(img, txt, tau):
    _, _, s = similarity(img, txt)
    n = len(s)
    total = 0.0
    for i in range(n):
        row = [s[i][j] / tau for j in range(n)]
        col = [s[j][i] / tau for j in range(n)]
        total = total - (row[i] - torch.log(sum(torch.exp(z) for z in row)))
        total = total - (col[i] - torch.log(sum(torch.exp(z) for z in col)))
    return total / (2 * n)


def ref_gcl(img, txt, tau):
    """(1/B) sum_i tau log mean_{j != i} exp((s_ij - s_ii)/tau), image side + text side."""
    _, _, s = similarity(img, txt)
    n = len(s)
    total = 0.0
    for i in range(n):
        total = total + tau * log_mean_exp([(s[i][j] - s[i][i]) / tau for j in range(n) if j != i])
        total = total + tau * log_mean_exp([(s[j][i] - s[i][i]) / tau for j in range(n) if j != i])
    return total / n


def ref_cyclip(img, txt, tau, lam_in=0.25, lam_cross=0.25):
    u, v, s = similarity(img, txt)
    n = len(s)
    inmodal = sum((dot(u[i], u[j]) - dot(v[i], v[j])) ** 2 for i in range(n) for j in range(n)) / n
    cross = sum((s[i][j] - s[j][i]) ** 2 for i in range(n) for j in range(n)) / n
    return ref_clip(img, txt, tau) + lam_in * inmodal + lam_cross * cross


def ref_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    n, d = x.shape
    invariance = sum((x[b, k] - y[b, k]) ** 2 for b in range(n) for k in range(d)) / (n * d)
    total = sim_coeff * invariance
    for z in (x, y):
        mean = [sum(z[b, k] for b in range(n)) / n for k in range(d)]
        cov = [
            [sum((z[b, k] - mean[k]) * (z[b, m] - mean[m]) for b in range(n)) / (n - 1) for m in range(d)]
            for k in range(d)
        ]
        std = [torch.sqrt(cov[k][k] + 1e-4) for k in range(d)]
        total = total + std_coeff * sum(torch.relu(1 - std[k]) for k in range(d)) / d / 2
        total = total + cov_coeff * sum(cov[k][m] ** 2 for k in range(d) for m in range(d) if k != m) / d
    return total


def ref_siglip(img, txt, t, bias):
    _, _, s = similarity(img, txt)
    n = len(s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(label * (torch.exp(t) * s[i][j] + bias)))
    return total / n


class RefSogClr:
    """Unshifted float64 SogCLR: U_i <- g_i on first visit, else (1-gamma) U_i + gamma g_i."""

    def __init__(self, gamma, tau):
        self.gamma, self.tau, self.u_img, self.u_txt = gamma, tau, {}, {}

    def __call__(self, img, txt, index):
        _, _, s = similarity(img, txt)
        n = len(s)
        surrogate, estimate = 0.0, 0.0
        for side, table in (("img", self.u_img), ("txt", self.u_txt)):
            for i in range(n):
                score = (lambda a, b: s[a][b]) if side == "img" else (lambda a, b: s[b][a])
                diffs = {j: score(i, j) - score(i, i) for j in range(n) if j != i}
                g = sum(torch.exp(d.detach() / self.tau) for d in diffs.values()) / (n - 1)
                key = int(index[i])
                table[key] = g if key not in table else (1 - self.gamma) * table[key] + self.gamma * g
                for d in diffs.values():
                    surrogate = surrogate + (torch.exp(d.detach() / self.tau) / table[key]) * d / ((n - 1) * n)
                estimate = estimate + self.tau * torch.log(table[key]) / n
        return surrogate, estimate


def ref_onlineclr_steps(batches, tau, gamma=0.5, pos_scale=10.0):
    """Official OnlineCLR, unshifted, over several steps; returns [(value, (grad_img, grad_txt))]."""
    u_neg, u_pos, out = 0.0, 0.0, []
    tau_pos = pos_scale * tau
    for img, txt in batches:
        img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        _, _, s = similarity(img, txt)
        n = len(s)
        directions = [s, [[s[j][i] for j in range(n)] for i in range(n)]]  # image->text, text->image
        neg_sum = sum(
            torch.exp(m[i][j].detach() / tau) for m in directions for i in range(n) for j in range(n) if i != j
        )
        pos_sum = sum(torch.exp(-m[i][i].detach() / tau_pos) for m in directions for i in range(n))
        u_neg = (1 - gamma) * u_neg + gamma * neg_sum
        u_pos = (1 - gamma) * u_pos + gamma * pos_sum
        value = 0.0
        for m in directions:
            for i in range(n):
                for j in range(n):
                    if i != j:
                        value = value + torch.exp(m[i][j].detach() / tau) / u_neg * m[i][j]
                    else:
                        value = value - torch.exp(-m[i][i].detach() / tau_pos) / u_pos * m[i][i]
        out.append((value.detach(), torch.autograd.grad(value, (img, txt))))
    return out


# --------------------------------------------------------------- helpers
def batch(seed, n=B, d=D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


def value_and_grads(loss, img, txt, index=None):
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    value = loss(img, txt, index)
    return (value.detach(), *torch.autograd.grad(value, (img, txt)))


def assert_close(actual, expected, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ CLIP
def test_clip_hand_worked_2x2():
    # Orthogonal unit directions, tau = 0.5: logits = 2 I. Each cross-entropy is
    # -log(e^2 / (e^2 + 1)) = log(1 + e^-2). dL/ds_11 = -sigmoid(-2), dL/ds_12 = +sigmoid(-2)
    # (1/2 of the mean, 1/tau = 2, row and column parts). So dL/du_1 = sigmoid(-2) (v_2 - v_1)
    # = sigmoid(-2) (-1, 1); the normalisation removes the radial part and divides by the raw
    # norm: image row 1, raw (2, 0), gets (0, sigmoid(-2) / 2).
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    value, g_img, g_txt = value_and_grads(make_loss("clip", temperature=0.5), img, txt)
    sig = 1 / (1 + math.exp(2))
    assert_close(value, math.log(1 + math.exp(-2)))
    assert_close(g_img, [[0.0, sig / 2], [sig, 0.0]])
    assert_close(g_txt, [[0.0, sig], [sig / 3, 0.0]])


@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_clip_matches_reference(tau):
    img, txt = batch(0)
    value, g_img, g_txt = value_and_grads(make_loss("clip", temperature=tau), img, txt, torch.arange(B))
    ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = ref_clip(ri, rt, tau)
    assert_close(value, ref.detach())
    r_img, r_txt = torch.autograd.grad(ref, (ri, rt))
    assert_close(g_img, r_img)
    assert_close(g_txt, r_txt)


# ---------------------------------------------------------------- SogCLR
@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_sogclr_gamma_one_is_exact_batch_gcl(tau):
    loss = make_loss("sogclr", temperature=tau, num_samples=20, gamma=1.0).double()
    index = torch.tensor([3, 7, 0, 19, 11, 5])
    for seed in (0, 1):  # the second call must not depend on the state either
        img, txt = batch(seed)
        value, g_img, g_txt = value_and_grads(loss, img, txt, index)
        ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        ref = ref_gcl(ri, rt, tau)
        r_img, r_txt = torch.autograd.grad(ref, (ri, rt))
        assert_close(value, ref.detach())
        assert_close(g_img, r_img)
        assert_close(g_txt, r_txt)


def test_sogclr_moving_average_matches_reference_over_steps():
    tau, gamma = 0.05, 0.8
    loss = make_loss("sogclr", temperature=tau, num_samples=12, gamma=gamma).double()
    ref = RefSogClr(gamma, tau)
    indices = [torch.arange(0, 6), torch.arange(3, 9), torch.tensor([8, 0, 4, 2, 10, 6])]
    for step, index in enumerate(indices):
        img, txt = batch(10 + step)
        value, g_img, g_txt = value_and_grads(loss, img, txt, index)
        ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        surrogate, estimate = ref(ri, rt, index)
        r_img, r_txt = torch.autograd.grad(surrogate, (ri, rt))
        assert_close(value, estimate.detach())
        assert_close(g_img, r_img)
        assert_close(g_txt, r_txt)
    # the stored (shifted) state is the reference moving average: U = u * exp(b)
    for key, u in ref.u_img.items():
        assert_close(loss.u_image[key] * torch.exp(loss.b_image[key]), u, rtol=1e-9, atol=0)
    for key, u in ref.u_txt.items():
        assert_close(loss.u_text[key] * torch.exp(loss.b_text[key]), u, rtol=1e-9, atol=0)
    unseen = [k for k in range(12) if k not in ref.u_img]
    assert (loss.u_image[unseen] == 0).all()


def test_sogclr_float32_state_survives_scores_spanning_hundreds_of_logits():
    # tau = 0.005: scaled differences reach +-400, and the batches alternate between near-ties
    # (exp(+big)) and well-separated pairs (exp(-big)). Unshifted float32 would overflow or underflow;
    # the float64 reference (exp up to e^400 is representable) gives the exact moving average.
    tau, gamma = 0.005, 0.8
    loss = make_loss("sogclr", temperature=tau, num_samples=B, gamma=gamma)
    ref = RefSogClr(gamma, tau)
    index = torch.arange(B)
    g = torch.Generator().manual_seed(3)
    anchors = torch.randn(B, D, generator=g, dtype=torch.float64)
    for noise in [3.0, 0.01, 0.01, 3.0]:
        img = anchors.float()
        txt = (anchors + noise * torch.randn(B, D, generator=g, dtype=torch.float64)).float()
        value, g_img, g_txt = value_and_grads(loss, img, txt, index)
        ri, rt = img.double().requires_grad_(True), txt.double().requires_grad_(True)
        surrogate, estimate = ref(ri, rt, index)
        r_img, r_txt = torch.autograd.grad(surrogate, (ri, rt))
        assert torch.isfinite(value) and torch.isfinite(g_img).all() and torch.isfinite(g_txt).all()
        torch.testing.assert_close(value.double(), estimate.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_img.double(), r_img, rtol=1e-3, atol=1e-4 * r_img.abs().max().item())
        torch.testing.assert_close(g_txt.double(), r_txt, rtol=1e-3, atol=1e-4 * r_txt.abs().max().item())
        for u_buf, b_buf, table in ((loss.u_image, loss.b_image, ref.u_img), (loss.u_text, loss.b_text, ref.u_txt)):
            # u stays in [min(1, gamma/(B-1)), 1 + gamma]: no underflow whatever the history
            assert (u_buf >= min(1.0, gamma / (B - 1)) * (1 - 1e-6)).all() and (u_buf <= 1 + gamma).all()
            log_u = torch.log(u_buf.double()) + b_buf.double()
            expected = torch.log(torch.stack([table[k] for k in range(B)]))
            torch.testing.assert_close(log_u, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert max(abs(float(torch.log(u))) for u in ref.u_img.values()) > 100  # the range was really extreme


def test_sogclr_state_changes_the_result():
    index = torch.arange(B)
    warmed = make_loss("sogclr", num_samples=10, gamma=0.5)
    fresh = make_loss("sogclr", num_samples=10, gamma=0.5)
    first, second = batch(1, dtype=torch.float32), batch(2, dtype=torch.float32)
    warmed(*first, index)
    _, g_warm, _ = value_and_grads(warmed, *second, index)
    _, g_fresh, _ = value_and_grads(fresh, *second, index)
    assert (g_warm - g_fresh).abs().max() > 1e-3 * g_fresh.abs().max()


@pytest.mark.parametrize("name", ["sogclr", "isogclr", "onlineclr"])
def test_state_dict_round_trip(name):
    index = torch.tensor([0, 2, 4, 6, 8, 1])
    original = make_loss(name, num_samples=10, temperature=0.02)
    original(*batch(3, dtype=torch.float32), index)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    assert state and all(torch.isfinite(v).all() for v in state.values())
    restored = make_loss(name, num_samples=10, temperature=0.02)
    restored.load_state_dict(state)
    fresh = make_loss(name, num_samples=10, temperature=0.02)
    nxt = batch(4, dtype=torch.float32)
    v1, gi1, gt1 = value_and_grads(original, *nxt, index)
    v2, gi2, gt2 = value_and_grads(restored, *nxt, index)
    v3, _, _ = value_and_grads(fresh, *nxt, index)
    torch.testing.assert_close((v1, gi1, gt1), (v2, gi2, gt2), rtol=0, atol=0)
    assert not torch.equal(v1, v3)  # the restored state mattered
    for key, value in original.state_dict().items():
        torch.testing.assert_close(value, restored.state_dict()[key], rtol=0, atol=0)


def test_per_sample_state_buffers_are_registered():
    loss = make_loss("sogclr", num_samples=7)
    assert {k: tuple(v.shape) for k, v in loss.state_dict().items()} == {
        "u_image": (7,),
        "b_image": (7,),
        "u_text": (7,),
        "b_text": (7,),
    }
    assert loss.stateful and not make_loss("clip").stateful


# --------------------------------------------------------------- iSogCLR
def ref_isogclr_steps(batches, index, tau0, rho, lr, beta, clip, tmin, tmax):
    """gamma = 1: U_i = g_i, so every step is the batch objective with each sample's temperature."""
    tau_img = {int(k): tau0 for k in index}
    tau_txt = {int(k): tau0 for k in index}
    mom_img = {int(k): 0.0 for k in index}
    mom_txt = {int(k): 0.0 for k in index}
    out = []
    for img, txt in batches:
        img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        _, _, s = similarity(img, txt)
        n = len(s)
        value = 0.0
        for table, mom, score in ((tau_img, mom_img, lambda a, b: s[a][b]), (tau_txt, mom_txt, lambda a, b: s[b][a])):  # noqa: B023
            updates = {}
            for i in range(n):
                key = int(index[i])
                t = table[key]
                xs = [(score(i, j) - score(i, i)) / t for j in range(n) if j != i]
                lme = log_mean_exp(xs)
                value = value + (t * lme + t * rho) / n
                weights = [torch.exp(x.detach()) for x in xs]
                expected = sum(w * x.detach() for w, x in zip(weights, xs)) / sum(weights)
                grad = float(lme.detach() + rho - expected)
                grad = max(-clip, min(clip, grad))
                m = (1 - beta) * mom[key] + beta * grad
                updates[key] = (m, min(tmax, max(tmin, t - lr * m)))
            for key, (m, t) in updates.items():
                mom[key], table[key] = m, t
        out.append((value.detach(), torch.autograd.grad(value, (img, txt)), dict(tau_img), dict(tau_txt)))
    return out


@pytest.mark.parametrize("rho, tau_lr", [(8.0, 1e-3), (0.0, 2e-4), (8.0, 0.03)])
def test_isogclr_matches_reference(rho, tau_lr):
    index = torch.tensor([4, 1, 9, 0, 7, 3])
    params = dict(rho=rho, tau_lr=tau_lr, tau_beta=0.5, tau_grad_clip=5.0, tau_min=0.005, tau_max=0.05)
    tau0 = 2.0**-6  # exact in the float32 buffers the temperatures start in
    loss = make_loss("isogclr", temperature=tau0, num_samples=10, gamma=1.0, **params).double()
    batches = [batch(20), batch(21)]
    ref = ref_isogclr_steps(batches, index, tau0, rho, tau_lr, 0.5, 5.0, 0.005, 0.05)
    for (img, txt), (r_value, (r_img, r_txt), r_tau_img, r_tau_txt) in zip(batches, ref):
        value, g_img, g_txt = value_and_grads(loss, img, txt, index)
        assert_close(value, r_value)
        assert_close(g_img, r_img)
        assert_close(g_txt, r_txt)
        for key in r_tau_img:
            assert_close(loss.tau_image[key], r_tau_img[key], rtol=1e-9, atol=1e-12)
            assert_close(loss.tau_text[key], r_tau_txt[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rho, direction", [(8.0, -1), (0.0, +1)])
def test_isogclr_temperature_direction(rho, direction):
    # dF/dtau = rho - KL(p || uniform), KL <= log(B - 1) = log 5 < 8: rho = 8 lowers tau, rho = 0 raises it.
    loss = make_loss("isogclr", temperature=0.02, num_samples=B, gamma=1.0, rho=rho, tau_lr=1e-4)
    loss(*batch(5, dtype=torch.float32), torch.arange(B))
    change = torch.cat([loss.tau_image, loss.tau_text]) - 0.02
    assert (torch.sign(change) == direction).all(), change
    metrics = loss.extra_metrics()
    assert metrics["isogclr_tau_image"] == pytest.approx(float(loss.tau_image.mean()))


def test_isogclr_temperatures_stay_in_bounds():
    # the authors' step 0.03 (not the default) reaches the bounds within a few steps
    loss = make_loss("isogclr", temperature=0.01, num_samples=12, tau_lr=0.03)
    g = torch.Generator().manual_seed(0)
    seen_low = seen_high = False
    for step in range(8):
        index = torch.randperm(12, generator=g)[:B]
        img, txt = torch.randn(B, D, generator=g) * (1 + step), torch.randn(B, D, generator=g)
        loss(img, txt, index)
        taus = torch.cat([loss.tau_image, loss.tau_text])
        assert taus.min() >= 0.005 and taus.max() <= 0.05
        seen_low |= bool((taus == 0.005).any())
        seen_high |= bool((taus > 0.01).any())
    assert seen_low  # the bounds were reached, so the clamp was exercised


# ---------------------------------------------------------------- CyCLIP
@pytest.mark.parametrize("params", [{}, dict(lambda_inmodal=0.7, lambda_crossmodal=0.1)])
def test_cyclip_matches_reference(params):
    img, txt = batch(30)
    value, g_img, g_txt = value_and_grads(make_loss("cyclip", temperature=0.05, **params), img, txt)
    ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = ref_cyclip(ri, rt, 0.05, params.get("lambda_inmodal", 0.25), params.get("lambda_crossmodal", 0.25))
    r_img, r_txt = torch.autograd.grad(ref, (ri, rt))
    assert_close(value, ref.detach())
    assert_close(g_img, r_img)
    assert_close(g_txt, r_txt)


# ---------------------------------------------------------------- VICReg
@pytest.mark.parametrize("scale", [0.3, 2.0])  # std below 1 (hinge active) and above 1 (hinge off)
def test_vicreg_matches_reference(scale):
    img, txt = batch(40)
    img, txt = img * scale, txt * scale + 0.5
    value, g_img, g_txt = value_and_grads(make_loss("vicreg"), img, txt)
    ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = ref_vicreg(ri, rt)
    r_img, r_txt = torch.autograd.grad(ref, (ri, rt))
    assert_close(value, ref.detach())
    assert_close(g_img, r_img)
    assert_close(g_txt, r_txt)


# ------------------------------------------------------------- OnlineCLR
def test_onlineclr_matches_reference_over_two_steps():
    tau = 0.05
    loss = make_loss("onlineclr", temperature=tau).double()
    batches = [batch(50), batch(51)]
    ref = ref_onlineclr_steps(batches, tau)
    for (img, txt), (r_value, (r_img, r_txt)) in zip(batches, ref):
        value, g_img, g_txt = value_and_grads(loss, img, txt)
        assert_close(value, r_value)
        assert_close(g_img, r_img)
        assert_close(g_txt, r_txt)


def test_onlineclr_parameters_change_the_reference():
    params = dict(gamma=0.3, pos_temperature_scale=4.0)
    loss = make_loss("onlineclr", temperature=0.1, **params).double()
    batches = [batch(52), batch(53)]
    ref = ref_onlineclr_steps(batches, 0.1, gamma=0.3, pos_scale=4.0)
    for (img, txt), (r_value, _) in zip(batches, ref):
        assert_close(loss(img, txt), r_value)


# ---------------------------------------------------------------- SigLIP
def test_siglip_matches_reference_and_learns_scale_and_bias():
    img, txt = batch(60)
    loss = make_loss("siglip").double()
    assert loss.logit_scale.item() == pytest.approx(math.log(10)) and loss.logit_bias.item() == -10
    ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    value = loss(ri, rt)
    value.backward()
    t = loss.logit_scale.detach().clone().requires_grad_(True)  # log 10 rounded to float32 at creation
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    qi, qt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = ref_siglip(qi, qt, t, b)
    ref.backward()
    assert_close(value.detach(), ref.detach())
    assert_close(ri.grad, qi.grad)
    assert_close(rt.grad, qt.grad)
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None
    assert_close(loss.logit_scale.grad, t.grad)
    assert_close(loss.logit_bias.grad, b.grad)
    assert loss.extra_metrics()["siglip_scale"] == pytest.approx(10.0)
    assert loss.extra_metrics()["siglip_bias"] == pytest.approx(-10.0)
    assert set(dict(loss.named_parameters())) == {"logit_scale", "logit_bias"}


# ------------------------------------------------------ mixed precision
def adversarial_batches(n=4, d=8):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    eye = torch.eye(n, d)
    return {
        "identical": (a.repeat(n, 1), a.repeat(n, 1)),
        "orthogonal": (eye, eye.clone()),
        "orthogonal_mismatched": (eye, eye.roll(1, dims=0)),
        "one_pair_repeated": (a.repeat(n, 1), b.repeat(n, 1)),
        "random_large": (50 * torch.randn(n, d, generator=g), 50 * torch.randn(n, d, generator=g)),
    }


def cpu_autocast_supports(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ALL)
def test_finite_under_autocast_at_temperature_001(name, amp_dtype):
    if not cpu_autocast_supports(amp_dtype):
        pytest.skip(f"this torch has no CPU autocast to {amp_dtype}")
    loss = make_loss(name, temperature=0.01, num_samples=8)
    for case, (img, txt) in adversarial_batches().items():
        if name == "vicreg" and case == "random_large":
            # VICReg sees the raw scale: its true gradient at |z| ~ 50 exceeds the float16 range of
            # the caller's tensor (the loss itself stays finite in float32).
            continue
        for step in range(2):  # the second step runs on the state of the first
            leaf_img, leaf_txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=amp_dtype):
                assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == amp_dtype
                value = loss(leaf_img.to(amp_dtype), leaf_txt.to(amp_dtype), torch.arange(4) + step)
            value.backward()
            assert value.dtype == torch.float32
            assert torch.isfinite(value), (case, step, value)
            assert torch.isfinite(leaf_img.grad).all() and torch.isfinite(leaf_txt.grad).all(), (case, step)
            for key, state in loss.state_dict().items():
                assert torch.isfinite(state).all(), (case, key)


# ------------------------------------------------------- registry, errors
def test_registry_lists_every_loss():
    assert available_losses() == sorted(ALL)
    for name in ALL:
        assert isinstance(make_loss(name, num_samples=4), PairLoss)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'clipp'") as err:
        make_loss("clipp")
    for name in ALL:
        assert name in str(err.value)


def test_unknown_and_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="'gama'.*gamma"):
        make_loss("sogclr", num_samples=4, gama=0.5)
    with pytest.raises(ValueError, match="'gamma'=1.5"):
        make_loss("sogclr", num_samples=4, gamma=1.5)
    with pytest.raises(ValueError, match="'temperature'"):
        make_loss("clip", temperature=0.0)
    with pytest.raises(ValueError, match="'gamma'"):
        make_loss("clip", gamma=0.5)
    with pytest.raises(ValueError, match="'tau_max'"):
        make_loss("isogclr", num_samples=4, tau_min=0.05, tau_max=0.01)


@pytest.mark.parametrize("name", ["sogclr", "isogclr"])
def test_per_sample_state_needs_num_samples_and_valid_indices(name):
    with pytest.raises(ValueError, match="num_samples"):
        make_loss(name)
    loss = make_loss(name, num_samples=5)
    img, txt = batch(0, n=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"num_samples=5"):
        loss(img, txt, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="index"):
        loss(img, txt, None)
    with pytest.raises(ValueError, match="at least 2"):
        loss(img[:1], txt[:1], torch.tensor([0]))


def test_shape_errors_name_the_inputs():
    img, txt = batch(0, dtype=torch.float32)
    with pytest.raises(ValueError, match="image_emb and text_emb"):
        make_loss("clip")(img, txt[:, :3])
    with pytest.raises(ValueError, match="index must have shape"):
        make_loss("clip")(img, txt, torch.arange(B + 1))


def test_register_loss_adds_one_entry():
    @register_loss("test_mse")
    class MseLoss(PairLoss):
        """Mean squared distance of the pairs (test only)."""

        def compute(self, image_emb, text_emb, index):
            return (image_emb - text_emb).square().mean()

    try:
        assert "test_mse" in available_losses()
        img, txt = batch(0)
        assert_close(make_loss("test_mse")(img, txt), ((img - txt) ** 2).mean())
        with pytest.raises(ValueError, match="already registered"):
            register_loss("test_mse")(MseLoss)
    finally:
        LOSSES.pop("test_mse")


# ------------------------------------------- SogCLR, the code base's estimator
class RefOriginalSogClr:
    """Float64 loop of the code base's SogCLR: a running-max shift over every pair including the
    positive (b_i >= 0, never decreases), s_i <- g_i on first visit, else (1-gamma) s_i exp(b_old - b_i)
    + gamma g_i with g_i = mean_{j != i} exp(x_ij - b_i), and weights exp(x_ij - b_i) / (s_i + 1e-8)."""

    def __init__(self, gamma, tau, eps=1e-8):
        self.gamma, self.tau, self.eps, self.state = gamma, tau, eps, {"img": {}, "txt": {}}

    def __call__(self, img, txt, index):
        _, _, s = similarity(img, txt)
        n = len(s)
        surrogate, estimate = 0.0, 0.0
        for side, table in self.state.items():
            score = (lambda a, c: s[a][c]) if side == "img" else (lambda a, c: s[c][a])
            for i in range(n):
                key = int(index[i])
                diffs = {j: score(i, j) - score(i, i) for j in range(n)}  # j == i included: 0
                x = {j: float(d.detach()) / self.tau for j, d in diffs.items()}
                s_old, b_old = table.get(key, (None, 0.0))
                b = max([b_old] + list(x.values()))
                g = sum(math.exp(x[j] - b) for j in range(n) if j != i) / (n - 1)
                s_new = g if s_old is None else (1 - self.gamma) * s_old * math.exp(b_old - b) + self.gamma * g
                table[key] = (s_new, b)
                for j in range(n):
                    if j != i:
                        surrogate = surrogate + math.exp(x[j] - b) / (s_new + self.eps) * diffs[j] / ((n - 1) * n)
                estimate = estimate + self.tau * (math.log(s_new) + b) / n
        return surrogate, estimate


def test_sogclr_original_estimator_matches_loop_reference_over_steps():
    tau, gamma = 0.05, 0.8
    loss = make_loss("sogclr", temperature=tau, num_samples=12, gamma=gamma, estimator="original").double()
    ref = RefOriginalSogClr(gamma, tau)
    indices = [torch.arange(0, 6), torch.arange(3, 9), torch.tensor([8, 0, 4, 2, 10, 6])]
    for step, index in enumerate(indices):
        img, txt = batch(20 + step)
        img[:, 0] += 3.0 * (step - 1)  # move the scores between steps so the running max matters
        value, g_img, g_txt = value_and_grads(loss, img, txt, index)
        ri, rt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        surrogate, estimate = ref(ri, rt, index)
        r_img, r_txt = torch.autograd.grad(surrogate, (ri, rt))
        assert_close(value, estimate)
        assert_close(g_img, r_img)
        assert_close(g_txt, r_txt)
    for key, (s_ref, b_ref) in ref.state["img"].items():
        assert_close(loss.u_image[key], s_ref)
        assert_close(loss.b_image[key], b_ref)
        assert b_ref >= 0
    for key, (s_ref, b_ref) in ref.state["txt"].items():
        assert_close(loss.u_text[key], s_ref)
        assert_close(loss.b_text[key], b_ref)


def test_sogclr_original_estimator_damps_easy_anchors_at_tau_001():
    # Three unit vectors with pairwise cosine 0.75, image i = text i: every anchor has s_ii = 1 and
    # s_ij = 0.75, so x_ij = -25 at tau = 0.01 and U_i = e^-25 for every anchor and side. The exact
    # weights are exp(x)/U; the code base's are exp(x)/(U + 1e-8 e^b) with b = 0 (the positive's x_ii),
    # so every gradient is the exact one times e^-25 / (e^-25 + 1e-8) = 1.387e-3.
    # u_i = a e_i + c e_4 in R^4: u_i.u_j = a^2 [i == j] + c^2, so a^2 = 0.25, c^2 = 0.75
    rows = torch.zeros(3, 4, dtype=torch.float64)
    rows[:, :3] = torch.eye(3, dtype=torch.float64) * math.sqrt(0.25)
    rows[:, 3] = math.sqrt(0.75)
    sim = rows @ rows.T
    assert_close(sim, 0.75 + 0.25 * torch.eye(3, dtype=torch.float64))
    grads = {}
    for estimator in ("exact", "original"):
        loss = make_loss("sogclr", temperature=0.01, num_samples=3, estimator=estimator).double()
        _, g_img, g_txt = value_and_grads(loss, rows, rows.clone(), torch.arange(3))
        grads[estimator] = torch.cat([g_img, g_txt])
    assert grads["exact"].norm() > 1e-3
    ratio = math.exp(-25) / (math.exp(-25) + 1e-8)
    assert ratio == pytest.approx(1.387e-3, rel=1e-3)
    assert_close(grads["original"], grads["exact"] * ratio, rtol=1e-7, atol=0)


def test_sogclr_estimator_is_validated():
    with pytest.raises(ValueError, match="estimator"):
        make_loss("sogclr", num_samples=4, estimator="approximate")


def test_isogclr_defaults_cannot_cross_the_temperature_range_in_one_update():
    # Defaults (the code base's set): |step| <= tau_lr * tau_grad_clip = 1e-5 * 5 = 5e-5, while the
    # range is 0.05 - 0.005 = 0.045. Push as hard as possible: rho = 8 lowers tau from the top bound.
    loss = make_loss("isogclr", temperature=0.05, num_samples=B, gamma=1.0)
    assert loss.tau_lr * loss.tau_grad_clip == pytest.approx(5e-5)
    for step in range(3):
        before = torch.cat([loss.tau_image, loss.tau_text]).clone()
        loss(*batch(step, dtype=torch.float32), torch.arange(B))
        moved = (torch.cat([loss.tau_image, loss.tau_text]) - before).abs()
        assert moved.max() <= 5e-5 + 1e-9
        assert moved.max() > 0
    assert (loss.tau_max - loss.tau_min) / (loss.tau_lr * loss.tau_grad_clip) >= 900


# ------------------------------------------------------ logged values


def test_siglip_logs_its_learned_scale_as_a_temperature_and_its_bias():
    loss = make_loss("siglip", init_logit_scale=math.log(4.0), init_logit_bias=-3.0)
    assert loss.extra_metrics() == pytest.approx({"siglip_scale": 4.0, "siglip_temperature": 0.25, "siglip_bias": -3.0})


def test_isogclr_logs_the_mean_temperature_of_the_last_batch_after_its_update():
    loss = make_loss("isogclr", temperature=0.02, num_samples=2 * B, gamma=1.0, tau_lr=1e-4)
    # before any step: the mean over all samples (every one at its initial temperature)
    assert loss.extra_metrics() == pytest.approx({"isogclr_tau_image": 0.02, "isogclr_tau_text": 0.02})
    index = torch.arange(B, 2 * B)
    loss(*batch(5, dtype=torch.float32), index)
    logged = loss.extra_metrics()
    assert set(logged) == {"isogclr_tau_image", "isogclr_tau_text"}
    assert logged["isogclr_tau_image"] == pytest.approx(float(loss.tau_image[index].mean()))
    assert logged["isogclr_tau_text"] == pytest.approx(float(loss.tau_text[index].mean()))
    # the batch moved (rho = 8 lowers every temperature); samples outside it kept 0.02
    assert logged["isogclr_tau_image"] < 0.02 and float(loss.tau_image[:B].mean()) == pytest.approx(0.02)


# ------------------------------------------------------ constructors: documented defaults, named refusals


def test_each_loss_class_has_its_documented_defaults():
    from clipstudy.core.losses import LOSSES

    expected = {  # the Args sections of the docstrings (and docs): temperature 0.01 everywhere
        "clip": {},
        "siglip": {},
        "cyclip": {"lambda_inmodal": 0.25, "lambda_crossmodal": 0.25},
        "vicreg": {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0},
        "sogclr": {"gamma": 0.8, "estimator": "exact"},
        "isogclr": {
            "gamma": 0.8,
            "rho": 8.0,
            "tau_min": 0.005,
            "tau_max": 0.05,
            "tau_lr": 1e-5,
            "tau_beta": 0.5,
            "tau_grad_clip": 5.0,
        },
        "onlineclr": {"gamma": 0.5, "pos_temperature": 0.1},
    }
    for name, fields in expected.items():
        loss = LOSSES[name](num_samples=4)
        assert loss.temperature == 0.01, name
        assert {k: getattr(loss, k) for k in fields} == fields, name
    isogclr = LOSSES["isogclr"](num_samples=4)
    assert isogclr.tau_image.tolist() == pytest.approx([0.01] * 4) == isogclr.tau_text.tolist()


@pytest.mark.parametrize(
    "name, param, value, requirement",
    [
        ("cyclip", "lambda_inmodal", -0.5, "must be a finite number >= 0"),
        ("cyclip", "lambda_crossmodal", -0.5, "must be a finite number >= 0"),
        ("vicreg", "sim_coeff", -1.0, "must be a finite number >= 0"),
        ("vicreg", "std_coeff", -1.0, "must be a finite number >= 0"),
        ("vicreg", "cov_coeff", float("inf"), "must be a finite number >= 0"),
        ("sogclr", "gamma", 0.0, "must be in (0, 1]"),
        ("sogclr", "estimator", "approx", "choose one of ('exact', 'original')"),
        ("isogclr", "rho", -1.0, "must be a finite number >= 0"),
        ("isogclr", "tau_min", 0.0, "must be a finite number > 0"),
        ("isogclr", "tau_max", -0.1, "must be a finite number > 0"),
        ("isogclr", "tau_lr", -1e-5, "must be a finite number >= 0"),
        ("isogclr", "tau_beta", 1.5, "must be in (0, 1]"),
        ("isogclr", "tau_grad_clip", 0, "must be a finite number > 0"),
        ("isogclr", "tau_max", 0.004, "must be >= tau_min=0.005"),
        ("isogclr", "temperature", 0.06, "the initial temperature must lie in [tau_min, tau_max] = [0.005, 0.05]"),
        ("onlineclr", "gamma", True, "must be in (0, 1]"),
        ("onlineclr", "pos_temperature_scale", 0.0, "must be a finite number > 0"),
        ("siglip", "init_logit_bias", float("nan"), "must be a finite number"),
        ("siglip", "init_logit_scale", float("inf"), "must be a finite number"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it_its_value_and_the_rule(name, param, value, requirement):
    with pytest.raises(ValueError) as raised:
        make_loss(name, num_samples=4, **{param: value})
    assert str(raised.value) == f"loss parameter {param!r}={value!r}: {requirement}"


def test_isogclr_accepts_a_fixed_temperature_at_both_bounds():
    # tau_min == tau_max == temperature: a legal (fixed) temperature, the updates are clamped to it
    loss = make_loss("isogclr", temperature=0.02, num_samples=B, tau_min=0.02, tau_max=0.02, tau_lr=1e-3)
    loss(*batch(6, dtype=torch.float32), torch.arange(B))
    assert loss.tau_image.tolist() == pytest.approx([0.02] * B) and loss.tau_text.tolist() == pytest.approx([0.02] * B)


def test_every_registered_loss_knows_its_name():
    for name in available_losses():
        assert LOSSES[name].name == name and make_loss(name, num_samples=4).name == name


@pytest.mark.parametrize("name", ["sogclr", "isogclr", "onlineclr", "vicreg", "clip", "siglip"])
def test_the_smallest_batch_a_loss_accepts_and_the_refusal_below_it(name):
    loss = make_loss(name, num_samples=4)
    smallest = loss.min_batch
    img, txt = batch(7, n=smallest, dtype=torch.float32)
    assert torch.isfinite(loss(img, txt, torch.arange(smallest)))
    if smallest > 1:
        with pytest.raises(ValueError) as raised:
            loss(img[: smallest - 1], txt[: smallest - 1], torch.arange(smallest - 1))
        assert str(raised.value) == (
            f"loss {name!r} needs a (global) batch of at least {smallest} pairs, got {smallest - 1}"
        )


def test_embeddings_and_indices_are_checked_naming_what_is_wrong():
    loss = make_loss("sogclr", num_samples=5)
    img, txt = batch(8, n=3, dtype=torch.float32)
    with pytest.raises(TypeError) as raised:
        loss(img, txt.long(), torch.arange(3))
    assert str(raised.value) == "loss 'sogclr': embeddings must be floating point, got torch.float32 and torch.int64"
    with pytest.raises(ValueError) as raised:
        loss(img, txt, torch.tensor([0, 1, 5]))
    assert str(raised.value) == (
        "loss 'sogclr': dataset indices must be in [0, num_samples=5), got values in "
        "[0, 5]; build the loss with num_samples=len(training set)"
    )


def test_unknown_parameters_are_listed_with_the_ones_the_loss_has():
    with pytest.raises(ValueError) as raised:
        make_loss("onlineclr", gama=0.5, tau=2)
    assert str(raised.value) == (
        "loss 'onlineclr' has no parameter 'gama', 'tau'; its parameters are ['gamma', 'pos_temperature_scale']"
    )
    with pytest.raises(ValueError) as raised:
        make_loss("clip", gamma=0.5)
    assert str(raised.value) == "loss 'clip' has no parameter 'gamma'; its parameters are none besides temperature"


class _MinimalLoss(PairLoss):
    """A new loss as a user writes one: compute only, the base class's constructor."""

    def compute(self, image_emb, text_emb, index):
        return (image_emb - text_emb).square().mean() / self.temperature


def test_a_loss_with_only_compute_gets_the_documented_base_defaults():
    loss = _MinimalLoss()
    assert loss.temperature == 0.01 and loss.num_samples is None and _MinimalLoss.parameter_names() == []
    assert _MinimalLoss(num_samples=1).num_samples == 1  # the smallest training set


@pytest.mark.parametrize("value", [0, 2.5, True, -3])
def test_num_samples_must_be_a_positive_integer(value):
    with pytest.raises(ValueError) as raised:
        make_loss("sogclr", num_samples=value)
    assert str(raised.value) == (
        f"loss parameter 'num_samples'={value!r}: must be an integer >= 1 (the training set size)"
    )


def test_the_index_is_checked_naming_its_problem():
    loss = make_loss("sogclr", num_samples=5)
    img, txt = batch(9, n=3, dtype=torch.float32)
    with pytest.raises(ValueError) as raised:
        loss(img, txt)
    assert str(raised.value) == (
        "loss 'sogclr' keeps per-sample state: pass index, the LongTensor [B] of the rows' dataset indices"
    )
    with pytest.raises(ValueError) as raised:
        loss(img, txt, torch.arange(4))
    assert str(raised.value) == "loss 'sogclr': index must have shape [B]=(3,), got (4,)"
    for wrong in (torch.tensor([True, False, True]), torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(TypeError) as raised:
            loss(img, txt, wrong)
        assert str(raised.value) == f"loss 'sogclr': index must be an integer tensor, got {wrong.dtype}"
