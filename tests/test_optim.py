"""Optimizers, weight-decay groups and the schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipstudy.core.losses import make_loss
from clipstudy.core.optim import (
    OPTIMIZERS,
    available_optimizers,
    build_optimizer,
    default_lr,
    make_scheduler,
    param_groups,
)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)
        self.ln = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(3))  # a 1-d parameter outside any norm layer
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)


def groups_by_name(groups):
    return {g["name"]: (set(g["param_names"]), g["weight_decay"]) for g in groups}


def test_weight_decay_groups_by_parameter_name():
    model, loss = Mixed(), make_loss("siglip")
    groups = groups_by_name(param_groups(model, loss, weight_decay=0.05))
    assert groups == {
        "decay": ({"emb.weight", "conv.weight", "fc.weight"}, 0.05),
        "no_decay": ({"conv.bias", "bn.weight", "bn.bias", "fc.bias", "ln.weight", "ln.bias", "scale"}, 0.0),
        "loss": ({"loss.logit_scale", "loss.logit_bias"}, 0.0),
    }
    # every trainable parameter exactly once, the groups' tensors match their names
    for group in param_groups(model, loss):
        owner = {**{n: p for n, p in model.named_parameters()}, **{f"loss.{n}": p for n, p in loss.named_parameters()}}
        assert [id(owner[n]) for n in group["param_names"]] == [id(p) for p in group["params"]]


def test_groups_without_loss_parameters_and_norm_inside_containers():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.GroupNorm(1, 2), nn.Linear(2, 1)))
    groups = groups_by_name(param_groups(model, make_loss("clip")))
    assert groups == {
        "decay": ({"0.weight", "1.1.weight"}, 0.02),
        "no_decay": ({"0.bias", "1.0.weight", "1.0.bias", "1.1.bias"}, 0.0),
    }


def test_loss_parameters_are_optimised_without_decay():
    loss = make_loss("siglip")
    opt = build_optimizer("adamw", nn.Linear(2, 2), loss, lr=0.1)
    (loss.logit_scale * 0 + loss.logit_scale + loss.logit_bias).backward()
    before = loss.logit_scale.item()
    opt.step()
    # AdamW's first step with gradient 1 and no decay moves by lr * 1 / (1 + eps)
    assert loss.logit_scale.item() == pytest.approx(before - 0.1, rel=1e-6)


def zero_gradient_step(name, w0, lr, wd, steps):
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w0], dtype=torch.float32))
    opt = build_optimizer(name, model, lr=lr, weight_decay=wd)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (model.weight.sum() * 0).backward()  # the loss gradient is exactly zero
        opt.step()
        out.append(model.weight.detach().clone()[0])
    return out


def test_adamw_decay_is_decoupled_and_adam_decay_is_l2():
    w0, lr, wd, eps, b1, b2 = [2.0, -0.5], 0.1, 0.5, 1e-8, 0.9, 0.999
    # AdamW: the Adam part sees gradient 0 (update 0/(0+eps) = 0); decay shrinks w by lr*wd*w.
    adamw = zero_gradient_step("adamw", w0, lr, wd, 2)
    expected = [w * (1 - lr * wd) for w in w0]
    torch.testing.assert_close(adamw[0], torch.tensor(expected))
    torch.testing.assert_close(adamw[1], torch.tensor([w * (1 - lr * wd) ** 2 for w in w0]))
    # Adam + L2: gradient g = wd*w goes through the normalisation. Step 1: m_hat = g, v_hat = g^2,
    # so w1 = w0 - lr * g / (|g| + eps): a step of ~lr * sign(w), whatever |w|.
    adam = zero_gradient_step("adam", w0, lr, wd, 2)
    g1 = [wd * w for w in w0]
    w1 = [w - lr * g / (abs(g) + eps) for w, g in zip(w0, g1)]
    torch.testing.assert_close(adam[0], torch.tensor(w1))
    assert w1 == pytest.approx([1.9, -0.4], abs=1e-6)
    # Step 2 by the Adam formulas: m2 = b1 m1 + (1-b1) g2, v2 = b2 v1 + (1-b2) g2^2, bias-corrected.
    w2 = []
    for w, g in zip(w1, g1):
        g2 = wd * w
        m = b1 * (1 - b1) * g + (1 - b1) * g2
        v = b2 * (1 - b2) * g * g + (1 - b2) * g2 * g2
        m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
        w2.append(w - lr * m_hat / (math.sqrt(v_hat) + eps))
    torch.testing.assert_close(adam[1], torch.tensor(w2))


def test_sgd_is_nesterov_with_momentum_09():
    opt = build_optimizer("sgd", nn.Linear(2, 2), weight_decay=0.0)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    # Constant gradient c: buf1 = c, step1 = c + 0.9 c = 1.9 c; buf2 = 1.9 c, step2 = c + 0.9 * 1.9 c = 2.71 c.
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    c = torch.tensor([[1.0, -2.0, 0.5]])
    opt = build_optimizer("sgd", model, lr=0.01, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        (model.weight * c).sum().backward()
        opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 - 0.01 * (1.9 + 2.71) * c)


def test_sgd_weight_decay_is_l2():
    # zero loss gradient: g = wd*w, nesterov step 1 = 1.9 g
    (w1,) = zero_gradient_step("sgd", [2.0, -0.5], 0.1, 0.5, 1)
    torch.testing.assert_close(w1, torch.tensor([w - 0.1 * 1.9 * 0.5 * w for w in [2.0, -0.5]]))


def test_defaults_and_errors():
    assert available_optimizers() == ["adam", "adamw", "sgd"]
    assert all(default_lr(name) == 2e-4 for name in available_optimizers())
    opt = build_optimizer("adam", nn.Linear(2, 2))
    assert all(g["lr"] == 2e-4 for g in opt.param_groups)
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    assert isinstance(build_optimizer("adamw", nn.Linear(2, 2), lr=1e-3, betas=(0.8, 0.9)), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'") as err:
        build_optimizer("lamb", nn.Linear(2, 2))
    assert all(name in str(err.value) for name in OPTIMIZERS)
    with pytest.raises(ValueError, match="lr=-0.1"):
        build_optimizer("sgd", nn.Linear(2, 2), lr=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer("sgd", nn.Linear(2, 2), weight_decay=-1.0)
    with pytest.raises(ValueError, match="'betass'"):
        build_optimizer("adamw", nn.Linear(2, 2), betass=(0.9, 0.99))
    with pytest.raises(ValueError, match="unknown optimizer"):
        default_lr("lamb")


# ------------------------------------------------------------- scheduler
def lr_sequence(scheduler, optimizer, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def formula(t, base, total, warmup, start, end):
    if t < warmup:
        return start + (base - start) * t / warmup
    if t >= total:
        return end
    return end + (base - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_schedule_warmup_then_cosine():
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=2e-4)
    sched = make_scheduler(opt, total_steps=100, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-6)
    lrs = [row[0] for row in lr_sequence(sched, opt, 121)]
    assert lrs[0] == pytest.approx(1e-5)  # step 0: warmup_lr
    assert lrs[5] == pytest.approx(1e-5 + (2e-4 - 1e-5) / 2)  # half-way through the warm-up
    assert lrs[10] == pytest.approx(2e-4)  # end of warm-up: the base rate
    assert lrs[55] == pytest.approx((2e-4 + 1e-6) / 2)  # middle of the cosine
    assert lrs[99] == pytest.approx(1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lrs[100] == pytest.approx(1e-6) and lrs[120] == pytest.approx(1e-6)
    for t, lr in enumerate(lrs):
        assert lr == pytest.approx(formula(t, 2e-4, 100, 10, 1e-5, 1e-6), rel=1e-9)


def test_schedule_applies_to_every_group_and_resumes():
    opt = build_optimizer("sgd", nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), make_loss("siglip"), lr=1e-3)
    assert len(opt.param_groups) == 3
    sched = make_scheduler(opt, total_steps=40, warmup_steps=5)
    lr_sequence(sched, opt, 17)
    state, opt_state = sched.state_dict(), opt.state_dict()
    assert state["last_epoch"] == 17
    rest = torch.tensor(lr_sequence(sched, opt, 10), dtype=torch.float64)
    expected = [formula(t, 1e-3, 40, 5, 1e-5, 1e-6) for t in range(17, 27)]
    torch.testing.assert_close(rest, torch.tensor(expected).unsqueeze(1).expand(10, 3).double())
    # resume as the training loop does: optimizer state, then scheduler state
    opt2 = build_optimizer("sgd", nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), make_loss("siglip"), lr=1e-3)
    sched2 = make_scheduler(opt2, total_steps=40, warmup_steps=5)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    torch.testing.assert_close(torch.tensor(lr_sequence(sched2, opt2, 10), dtype=torch.float64), rest)


def test_schedule_edge_cases():
    # warm-up target below warmup_lr: the start is capped at the base rate (no "warm-down")
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=5e-6)
    lrs = [
        r[0]
        for r in lr_sequence(make_scheduler(opt, total_steps=10, warmup_steps=4, warmup_lr=1e-5, min_lr=1e-6), opt, 11)
    ]
    assert lrs[:5] == pytest.approx([5e-6] * 5) and lrs[10] == pytest.approx(1e-6)
    # one step, no warm-up: the single iteration runs at the base rate
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=1e-3)
    assert [r[0] for r in lr_sequence(make_scheduler(opt, total_steps=1, warmup_steps=0), opt, 2)] == pytest.approx(
        [1e-3, 1e-6]
    )
    # all warm-up
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=1e-3)
    lrs = [r[0] for r in lr_sequence(make_scheduler(opt, total_steps=2, warmup_steps=2, warmup_lr=0.0), opt, 2)]
    assert lrs == pytest.approx([0.0, 5e-4])
    # a zero base rate stays zero (two groups: decay and no_decay)
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=0.0)
    assert lr_sequence(make_scheduler(opt, total_steps=5, warmup_steps=2), opt, 5) == [[0.0, 0.0]] * 5
    opt = build_optimizer("adamw", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="warmup_steps=11"):
        make_scheduler(opt, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps=0"):
        make_scheduler(opt, total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        make_scheduler(opt, total_steps=10, warmup_steps=1, min_lr=-1.0)
    assert isinstance(make_scheduler(opt, total_steps=10, warmup_steps=1), torch.optim.lr_scheduler.LambdaLR)


def original_code_base_lrs(base, warmup_lr, min_lr, epochs, steps_per_epoch, warmup_epochs=5, step_size=100):
    """Replays the code base's calls: timm's CosineLRScheduler(t_initial=epochs, warmup_t=5, warmup_prefix,
    cycle_limit=1) stepped with t = i // 100 at i % 100 == 0, i <= 500 in epoch 0, and t = e + 6 after epoch e."""

    def lr_of(t):
        if t < warmup_epochs:
            return warmup_lr + t * (base - warmup_lr) / warmup_epochs
        t -= warmup_epochs
        if t >= epochs:  # past the single cycle
            return min_lr
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))

    lr, out = lr_of(0), []  # the scheduler's constructor sets warmup_lr
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            if epoch == 0 and i % step_size == 0 and i <= warmup_epochs * step_size:
                lr = lr_of(i // step_size)
            out.append(lr)
        lr = lr_of(epoch + warmup_epochs + 1)
    return out


@pytest.mark.parametrize("steps_per_epoch", [700, 300])  # warm-up inside epoch 0, or cut by its end
def test_original_schedule_replays_the_code_base(steps_per_epoch):
    epochs = 4
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=2e-4)
    sched = make_scheduler(
        opt,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=500,
        kind="original",
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        warmup_lr=1e-5,
        min_lr=1e-6,
    )
    lrs = [row[0] for row in lr_sequence(sched, opt, epochs * steps_per_epoch)]
    expected = original_code_base_lrs(2e-4, 1e-5, 1e-6, epochs, steps_per_epoch)
    assert lrs == pytest.approx(expected, rel=1e-9)
    # hand-worked points: the staircase (1e-5 + k * 3.8e-5) and the first cosine epoch
    assert lrs[99] == pytest.approx(1e-5) and lrs[100] == pytest.approx(4.8e-5) and lrs[299] == pytest.approx(8.6e-5)
    assert lrs[steps_per_epoch] == pytest.approx(1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_original_schedule_resumes_and_validates():
    opt = build_optimizer("adamw", nn.Linear(2, 2), lr=2e-4)
    sched = make_scheduler(opt, total_steps=40, warmup_steps=5, kind="original", steps_per_epoch=10, epochs=4)
    lr_sequence(sched, opt, 17)
    state, opt_state = sched.state_dict(), opt.state_dict()
    rest = lr_sequence(sched, opt, 23)
    # resume as the training loop does: build, then optimizer state, then scheduler state
    opt2 = build_optimizer("adamw", nn.Linear(2, 2), lr=2e-4)
    sched2 = make_scheduler(opt2, total_steps=40, warmup_steps=5, kind="original", steps_per_epoch=10, epochs=4)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert lr_sequence(sched2, opt2, 23) == rest
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_scheduler(opt, total_steps=40, warmup_steps=5, kind="original")
    with pytest.raises(ValueError, match="lr_schedule"):
        make_scheduler(opt, total_steps=40, warmup_steps=5, kind="step")
