"""The numerics settings of a training run: --precision, --conv-algorithm, --lr-scaling and
--warmup-epochs (bad values end in one line, exit 2; bf16 and im2col runs train; the linear
scaling schedule follows its formula)."""

import json

import pytest

from labkit.runs import RunDir
from labkit.worker import scaled_lr

from .conftest import run_cli

BAD = [
    (["--precision", "fp16"], "--precision"),  # fp16 needs loss scaling and a GPU: not offered
    (["--precision", "int8"], "--precision"),
    (["--conv-algorithm", "gemm"], "--conv-algorithm"),
    (["--conv-algorithm", "winograd", "--model", "resnet"], "--conv-algorithm"),  # 1x1, stride 2
    (["--conv-algorithm", "im2col", "--model", "mlp"], "--conv-algorithm"),  # no convolution
    (["--lr-scaling", "quadratic"], "--lr-scaling"),
    (["--lr-scaling", "linear", "--sync", "gossip"], "--lr-scaling"),
    (["--lr-scaling", "linear", "--data-parallel", "bucketed"], "--lr-scaling"),
    (["--warmup-epochs", "1"], "--warmup-epochs"),
    (["--warmup-epochs", "-1", "--lr-scaling", "linear"], "--warmup-epochs"),
    (["--warmup-epochs", "soon", "--lr-scaling", "linear"], "--warmup-epochs"),
]


@pytest.mark.parametrize("args, option", BAD)
def test_bad_values_rejected_naming_the_option(args, option):
    from labkit.config import ConfigError, RunConfig

    changes = {}
    with pytest.raises(ConfigError) as e:
        for flag, text in zip(args[::2], args[1::2]):
            name = flag[2:].replace("-", "_")
            changes[name] = RunConfig.parse_value(name, text)
        RunConfig(**changes).validate()
    assert e.value.option == option and "\n" not in str(e.value)


@pytest.mark.parametrize("args, option", [BAD[3], BAD[9]])
@pytest.mark.timeout(60)
def test_bad_values_exit_2_with_one_line(tmp_path, args, option):
    out = run_cli("train", *args, "--run-dir", tmp_path / "run", cwd=tmp_path, timeout=50)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_winograd_accepted_for_lenet_3x3():
    from labkit.config import RunConfig

    RunConfig(model="lenet", conv_algorithm="winograd").validate()  # lenet's kernels are 3x3, stride 1


def test_scaled_lr_schedule_follows_the_formula():
    # no warmup: the scaled rate from the first step
    assert scaled_lr(1, 0.05, 4, 0) == pytest.approx(0.2)
    assert scaled_lr(100, 0.05, 4, 0) == pytest.approx(0.2)
    # warmup over 10 steps: lr + (lr*k - lr) * (step-1)/10, then lr*k
    for step, expected in [(1, 0.05), (2, 0.065), (6, 0.125), (10, 0.185), (11, 0.2), (500, 0.2)]:
        assert scaled_lr(step, 0.05, 4, 10) == pytest.approx(expected, abs=1e-12)
    # one worker: nothing changes
    assert all(scaled_lr(s, 0.05, 1, 10) == 0.05 for s in range(1, 30))


def _train_losses(run_dir):
    return {r["step"]: r["loss"] for r in RunDir(run_dir).iter_metrics(kind="train") if r["rank"] == 0}


@pytest.mark.timeout(120)
def test_lr_scaling_sets_the_optimizer_rate(tmp_path, no_leftovers):
    """A 2-worker run with linear scaling and no warmup trains exactly as a run with --lr
    doubled (factor 2 = the number of workers)."""
    common = ["train", "--quiet", "--workers", "2", "--steps", "6", "--log-every", "1", "--eval-every", "100"]
    runs = {}
    for name, extra in [("scaled", ["--lr-scaling", "linear"]), ("doubled", ["--lr", "0.1"])]:
        out = run_cli(*common, *extra, "--run-dir", tmp_path / name, timeout=100)
        assert out.returncode == 0, out.stderr
        runs[name] = _train_losses(tmp_path / name)
    assert runs["scaled"] == runs["doubled"] and len(runs["scaled"]) == 6


def test_attached_schedule_sets_each_steps_rate():
    """The hook the worker attaches sets the rate before every step, continuing a resumed run's count."""
    import torch

    from labkit import optim
    from labkit.config import RunConfig
    from labkit.worker import attach_lr_scaling

    config = RunConfig(lr=0.05, lr_scaling="linear", warmup_epochs=0.5)
    for start in (0, 3):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = attach_lr_scaling(optim.make_optimizer("torch-sgd", [p], lr=0.05, momentum=0.0),
                                config, world=4, steps_per_epoch=20, start_step=start)
        seen = []
        for _ in range(12):
            p.grad = torch.ones(2)
            before = p.detach().clone()
            opt.step()
            seen.append(float((before - p.detach())[0]))  # the step taken = lr * grad
        expected = [scaled_lr(s, 0.05, 4, 10) for s in range(start + 1, start + 13)]
        assert seen == pytest.approx(expected, rel=1e-6)


@pytest.mark.timeout(120)
def test_bf16_two_workers_train(tmp_path, no_leftovers):
    out = run_cli("train", "--quiet", "--workers", "2", "--precision", "bf16", "--epochs", "4",
                  "--eval-every", "1000", "--run-dir", tmp_path / "bf16", timeout=110)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_accuracy"] >= 0.9, summary


@pytest.mark.timeout(120)
def test_im2col_lenet_matches_torch_conv(tmp_path, no_leftovers):
    common = ["train", "--quiet", "--model", "lenet", "--steps", "6", "--log-every", "1",
              "--eval-every", "100"]
    for name in ("torch", "im2col"):
        out = run_cli(*common, "--conv-algorithm", name, "--run-dir", tmp_path / name, timeout=100)
        assert out.returncode == 0, out.stderr
    reference, im2col = _train_losses(tmp_path / "torch"), _train_losses(tmp_path / "im2col")
    assert sorted(reference) == sorted(im2col) == list(range(1, 7))
    for step in reference:
        assert im2col[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5)
