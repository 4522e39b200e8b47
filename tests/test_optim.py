"""labkit.optim against torch.optim: the same trajectories where the formulas agree, and
exactly the stated difference where they do not."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labkit import optim
from labkit.data import load_dataset
from labkit.models import build_model

STEPS = 100


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not crowd a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(seed=0):
    """A small regression net (float64) and a fixed stream of batches."""
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 5, generator=generator, dtype=torch.float64),
                torch.randn(16, 2, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    return model, batches


def trajectory(make, seed=0, lr_schedule=None):
    """Parameters after every step of ``make(params)`` over the batch stream."""
    model, batches = problem(seed)
    opt = make(model.parameters())
    out = []
    for step, (x, y) in enumerate(batches):
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
    return torch.stack(out)


SAME_AS_TORCH = {
    "sgd": (lambda p: optim.SGD(p, lr=0.05, weight_decay=1e-3),
            lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-3)),
    "momentum": (lambda p: optim.Momentum(p, lr=0.02, momentum=0.9, weight_decay=1e-3),
                 lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=1e-3)),
    "nesterov": (lambda p: optim.Nesterov(p, lr=0.02, momentum=0.9),
                 lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True)),
    "adagrad-eps0": (lambda p: optim.AdaGrad(p, lr=0.05, eps=0.0, weight_decay=1e-3),
                     lambda p: torch.optim.Adagrad(p, lr=0.05, eps=0.0, weight_decay=1e-3)),
    "rmsprop": (lambda p: optim.RMSProp(p, lr=0.01, alpha=0.9, eps=1e-8, weight_decay=1e-3),
                lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.9, eps=1e-8, weight_decay=1e-3)),
    "adam": (lambda p: optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-3),
             lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=1e-3)),
}


@pytest.mark.parametrize("name", SAME_AS_TORCH)
def test_trajectory_equals_torch_over_100_steps(name):
    ours, theirs = SAME_AS_TORCH[name]
    a, b = trajectory(ours), trajectory(theirs)
    assert (a[-1] - a[0]).abs().max() > 1e-2  # the weights really moved
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


def test_momentum_differs_from_torch_exactly_when_lr_changes():
    schedule = lambda step: 0.02 if step < 50 else 0.005  # noqa: E731
    ours = trajectory(lambda p: optim.Momentum(p, lr=0.02, momentum=0.9), lr_schedule=schedule)
    theirs = trajectory(lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9), lr_schedule=schedule)
    assert torch.allclose(ours[:50], theirs[:50], atol=1e-10)
    assert (ours[50] - theirs[50]).abs().max() > 1e-4
    # torch's step 50 = μ·(η_new/η_old)·(w49 − w48) − η_new·g; ours = μ·(w49 − w48) − η_new·g
    delta = ours[49] - ours[48]
    assert torch.allclose(ours[50] - theirs[50], 0.9 * delta * (1 - 0.005 / 0.02), atol=1e-12)


def test_nesterov_iterate_is_the_table_recursion():
    """The slide's recursion, run by hand with the gradient at w + μv, gives iterate()."""
    mu, lr = 0.9, 0.02
    model, batches = problem()
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    v = [torch.zeros_like(p) for p in params]
    opt = optim.Nesterov(params, lr=lr, momentum=mu)
    for x, y in batches:
        with torch.no_grad():  # the look-ahead point: where the table takes the gradient
            for p, wi, vi in zip(params, w, v):
                p.copy_(wi + mu * vi)
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        for p, wi, vi in zip(params, w, v):
            vi.mul_(mu).add_(p.grad, alpha=-lr)
            wi.add_(vi)
        # our optimizer, from the same look-ahead point and gradient
        opt.step()
        for ours, table, p, vi in zip(opt.iterate(), w, params, v):
            assert torch.allclose(ours, table, atol=1e-10)
            assert torch.allclose(p.detach(), table + mu * vi, atol=1e-10)


def test_adagrad_differs_from_torch_by_where_eps_sits():
    eps = 1e-3
    ours = trajectory(lambda p: optim.AdaGrad(p, lr=0.05, eps=eps))
    theirs = trajectory(lambda p: torch.optim.Adagrad(p, lr=0.05, eps=eps))
    assert (ours[-1] - theirs[-1]).abs().max() > 1e-6  # different with eps > 0
    # one step from the same state: the steps differ by (sqrt(A) + eps) / sqrt(A + eps)
    model, batches = problem()
    a, b = optim.AdaGrad(model.parameters(), lr=0.05, eps=eps), None
    x, y = batches[0]
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    a.step()
    for p, w0 in zip(model.parameters(), before):
        total = p.grad**2
        ours_step = p.detach() - w0
        torch_step = -0.05 * p.grad / (total.sqrt() + eps)
        assert torch.allclose(ours_step * total.add(eps).sqrt(), torch_step * (total.sqrt() + eps), atol=1e-14)
    del b


def table_adam_literal(lr, betas, eps, feed_back_corrected):
    """Adam from the table: with feed_back_corrected the corrected moment is the recursion's
    state (the literal reading); without, the raw moment is (Kingma and Ba)."""
    model, batches = problem()
    params = list(model.parameters())
    moments = [[torch.zeros_like(p), torch.zeros_like(p)] for p in params]
    out = []
    for t, (x, y) in enumerate(batches, start=1):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p, m in zip(params, moments):
                corrected = []
                for k, beta in enumerate(betas):
                    raw = beta * m[k] + (1 - beta) * p.grad ** (k + 1)
                    corrected.append(raw / (1 - beta**t))
                    m[k] = corrected[k] if feed_back_corrected else raw
                p -= lr * corrected[0] / (corrected[1].sqrt() + eps)
        out.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
    return torch.stack(out)


def test_adam_bias_correction_is_the_only_difference_from_the_table():
    ours = trajectory(lambda p: optim.Adam(p, lr=0.01, betas=(0.8, 0.99)))
    paper = table_adam_literal(0.01, (0.8, 0.99), 1e-8, feed_back_corrected=False)
    literal = table_adam_literal(0.01, (0.8, 0.99), 1e-8, feed_back_corrected=True)
    assert torch.allclose(ours, paper, atol=1e-10)
    assert torch.allclose(ours[0], literal[0], atol=1e-12)  # the same first step
    assert (ours[-1] - literal[-1]).abs().max() > 1e-3  # then the literal reading drifts away


def test_registry_and_settings():
    assert available_names()[:6] == ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]
    assert "torch-sgd" in available_names()  # the library's own, the default of a run
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(optim.make_optimizer("adam", p, lr=0.1, betas=(0.5, 0.5)), optim.Adam)
    assert optim.settings_for("adam", lr=0.1, momentum=0.9, weight_decay=0.0) == {"lr": 0.1, "weight_decay": 0.0}
    assert optim.settings_for("momentum", lr=0.1, momentum=0.5) == {"lr": 0.1, "momentum": 0.5}


def available_names():
    return optim.available_optimizers()


@pytest.mark.parametrize("call, message", [
    (lambda p: optim.make_optimizer("lbfgs", p), "--optimizer 'lbfgs': unknown optimizer"),
    (lambda p: optim.make_optimizer("adam", p, momentum=0.9), "does not take 'momentum'"),
    (lambda p: optim.SGD(p, lr=-1), "lr must be in (0, inf)"),
    (lambda p: optim.Momentum(p, momentum=1.0), "momentum must be in [0, 1)"),
    (lambda p: optim.RMSProp(p, alpha=2), "alpha must be in [0, 1)"),
    (lambda p: optim.Adam(p, betas=0.9), "betas must be a pair"),
    (lambda p: optim.Adam(p, betas=(0.9, 1.5)), "betas[1] must be in [0, 1)"),
    (lambda p: optim.AdaGrad(p, eps=-1), "eps must be in [0, inf)"),
    (lambda p: optim.SGD(p, lr="fast"), "lr must be a number"),
    (lambda p: optim.SGD(p, weight_decay=float("nan")), "weight_decay must be finite"),
])
def test_bad_arguments_are_value_errors_naming_them(call, message):
    with pytest.raises(ValueError) as info:
        call([torch.nn.Parameter(torch.zeros(2))])
    assert message in str(info.value)


@pytest.mark.parametrize("name, lr", [("sgd", 0.1), ("momentum", 0.05), ("nesterov", 0.05),
                                      ("adagrad", 0.05), ("rmsprop", 0.002), ("adam", 0.002)])
def test_each_optimizer_trains_an_mlp_on_digits(name, lr, one_thread):
    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    opt = optim.make_optimizer(name, model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(len(data.y_train), generator=generator).split(32):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy >= 0.93, f"{name}: {accuracy:.3f}"
    assert np.isfinite(accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("sync, name, lr", [("allreduce", "adam", 0.003), ("ps-sync", "nesterov", 0.05)])
def test_optimizer_option_trains_every_kind_of_mode(sync, name, lr, tmp_path):
    """``--optimizer`` reaches the workers (allreduce) and the master (ps-sync)."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "labkit.cli", "train", "--workers", "2", "--sync", sync,
                           "--optimizer", name, "--lr", str(lr), "--steps", "120", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert config["config"]["optimizer"] == name
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.9, summary


def test_bad_optimizer_option_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "labkit.cli", "train", "--optimizer", "lbfgs",
                           "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "labkit: error: --optimizer: unknown optimizer 'lbfgs'; choose one of "
        "sgd, momentum, nesterov, adagrad, rmsprop, adam, torch-sgd"]
    assert not (tmp_path / "r").exists()
