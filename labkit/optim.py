"""Optimizers written from the table of the HPC keynote (T. Hoefler, SC'19, "SGD and
optimizers"; the table comes from Ben-Nun & Hoefler, *Demystifying Parallel and Distributed
Deep Learning*, 2018).

Each one is a ``torch.optim.Optimizer`` that takes ``torch.optim``'s argument names (``lr``,
``momentum``, ``alpha``, ``betas``, ``eps``, ``weight_decay``), so it drops into any training
loop, and each ``step`` is the slide's formula written out per parameter tensor. Where the
slide's formula and ``torch.optim``'s differ, the class docstring says how; ``tests/test_optim.py``
checks every one against ``torch.optim`` over 100 steps and shows that each difference is
exactly the one stated.

Notation of the table: ``w`` weights, ``∇w`` the gradient of the loss at ``w``, ``η`` the
learning rate. ``weight_decay`` adds ``weight_decay * w`` to the gradient first (L2, as torch).

    from labkit.optim import make_optimizer, available_optimizers
    optimizer = make_optimizer("adam", model.parameters(), lr=1e-3)
"""

from __future__ import annotations

import math

import torch

from .registry import OPTIMIZERS


def _check(name: str, value, low: float, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> float:
    """``value`` as a float within [low, high] (or open ends); ValueError naming ``name`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = number <= low if open_low else number < low
    too_high = high is not None and (number >= high if open_high else number > high)
    if too_low or too_high:
        left = "(" if open_low else "["
        right = ")" if open_high else "]"
        upper = "inf)" if high is None else f"{high:g}{right}"
        raise ValueError(f"{name} must be in {left}{low:g}, {upper}, got {value!r}")
    return number


class _TableOptimizer(torch.optim.Optimizer):
    """What every optimizer of the table shares: argument checks and the L2 term."""

    def __init__(self, params, defaults: dict):
        defaults["lr"] = _check("lr", defaults["lr"], 0.0, open_low=True)
        defaults["weight_decay"] = _check("weight_decay", defaults["weight_decay"], 0.0)
        super().__init__(params, defaults)

    @staticmethod
    def gradient(p: torch.Tensor, group: dict) -> torch.Tensor:
        """∇w, with ``weight_decay * w`` added when weight decay is on."""
        if group["weight_decay"]:
            return p.grad.add(p, alpha=group["weight_decay"])
        return p.grad

    def _parameters(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise ValueError(f"{type(self).__name__}: sparse gradients are not supported")
                    yield p, group

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, group in self._parameters():
            self.update(p, group, self.state[p])
        return loss

    def update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


@OPTIMIZERS.register("sgd", help="w ← w − η∇w")
class SGD(_TableOptimizer):
    """Plain SGD: w⁽ᵗ⁺¹⁾ = w⁽ᵗ⁾ − η·∇w⁽ᵗ⁾. The same as ``torch.optim.SGD(lr=η)``."""

    def __init__(self, params, lr: float = 0.05, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def update(self, p, group, state):
        p.add_(self.gradient(p, group), alpha=-group["lr"])


@OPTIMIZERS.register("momentum", help="heavy ball: w ← w + μ(w − w_prev) − η∇w")
class Momentum(_TableOptimizer):
    """Momentum [Qian 1999], as the table writes it: the heavy ball

        w⁽ᵗ⁺¹⁾ = w⁽ᵗ⁾ + μ·(w⁽ᵗ⁾ − w⁽ᵗ⁻¹⁾) − η·∇w⁽ᵗ⁾

    The state is the last displacement ``w⁽ᵗ⁾ − w⁽ᵗ⁻¹⁾`` (zero before the first step).

    ``torch.optim.SGD(momentum=μ)`` keeps instead a velocity in gradient units,
    ``b ← μ·b + ∇w; w ← w − η·b``. With a constant η the two are the same sequence of
    weights (η·b is minus the displacement). They differ when η changes (a schedule):
    torch's next step is μ·(η_new/η_old)·(w⁽ᵗ⁾ − w⁽ᵗ⁻¹⁾) − η_new·∇w — a change of η rescales the
    momentum already gathered — while here the past displacement keeps its size.
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0):
        momentum = _check("momentum", momentum, 0.0, 1.0, open_high=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def update(self, p, group, state):
        if "displacement" not in state:
            state["displacement"] = torch.zeros_like(p)
        displacement = state["displacement"]
        displacement.mul_(group["momentum"]).add_(self.gradient(p, group), alpha=-group["lr"])
        p.add_(displacement)


@OPTIMIZERS.register("nesterov", help="Nesterov momentum: the gradient taken at the look-ahead point")
class Nesterov(_TableOptimizer):
    """Nesterov momentum [Nesterov 1983], in the form of Sutskever et al. (2013):

        v_{t+1} = μ·v_t − η·∇ℓ(w_t + μ·v_t),    w_{t+1} = w_t + v_{t+1}

    The table writes the gradient point as ``w − μ·v``; with the update ``w ← w + v`` the point
    the weights are heading for is ``w + μ·v`` (with a minus sign the method would look back,
    not ahead), so that is the point used here.

    A training loop computes the gradient at the parameters, so the parameters hold the
    look-ahead point ŵ_t = w_t + μ·v_t. Rewritten in ŵ the update is

        v_{t+1} = μ·v_t − η·∇ℓ(ŵ_t),    ŵ_{t+1} = ŵ_t + μ·v_{t+1} − η·∇ℓ(ŵ_t)

    which is ``torch.optim.SGD(momentum=μ, nesterov=True)`` with torch's buffer b = −v/η. So with
    a constant η the parameters equal torch's, step for step; the table's own iterate w_t is
    the parameters minus μ·v_t, and :meth:`iterate` returns it.
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0):
        momentum = _check("momentum", momentum, 0.0, 1.0, open_high=True)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def update(self, p, group, state):
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(p)
        velocity, grad = state["velocity"], self.gradient(p, group)
        velocity.mul_(group["momentum"]).add_(grad, alpha=-group["lr"])
        p.add_(velocity, alpha=group["momentum"]).add_(grad, alpha=-group["lr"])

    @torch.no_grad()
    def iterate(self) -> list[torch.Tensor]:
        """The table's w_t for every parameter: the look-ahead point minus μ·v_t."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                velocity = self.state[p].get("velocity")
                out.append(p.clone() if velocity is None else p - group["momentum"] * velocity)
        return out


@OPTIMIZERS.register("adagrad", help="AdaGrad: η∇w / sqrt(Σ∇w² + ε)")
class AdaGrad(_TableOptimizer):
    """AdaGrad [Duchi et al. 2011], as the table writes it:

        w_i ← w_i − η·∇w_i / sqrt(A_i + ε),    A_i = Σ_τ (∇w_i⁽τ⁾)²

    ``torch.optim.Adagrad`` puts ε outside the root, η·∇w_i / (sqrt(A_i) + ε) (and has a
    learning-rate decay and an initial accumulator, both left at 0 here). That is the only
    difference: with ε = 0 the two trajectories are the same, and from the same A_i one step
    of each differs by the factor (sqrt(A_i) + ε) / sqrt(A_i + ε).
    """

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-10, weight_decay: float = 0.0):
        eps = _check("eps", eps, 0.0)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def update(self, p, group, state):
        if "sum_of_squares" not in state:
            state["sum_of_squares"] = torch.zeros_like(p)
        grad = self.gradient(p, group)
        total = state["sum_of_squares"].addcmul_(grad, grad)
        p.addcdiv_(grad, total.add(group["eps"]).sqrt_(), value=-group["lr"])


@OPTIMIZERS.register("rmsprop", help="RMSProp: η∇w / (sqrt(running mean of ∇w²) + ε)")
class RMSProp(_TableOptimizer):
    """RMSProp [Hinton 2012], as the table writes it:

        w_i ← w_i − η·∇w_i / (sqrt(A'_i) + ε),    A'_i ← β·A'_i + (1 − β)·(∇w_i)²

    torch calls β ``alpha``; the formula is ``torch.optim.RMSprop``'s (without its momentum and
    centered options), so the trajectories are the same.
    """

    def __init__(self, params, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0):
        alpha = _check("alpha", alpha, 0.0, 1.0, open_high=True)
        eps = _check("eps", eps, 0.0)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay))

    def update(self, p, group, state):
        if "mean_square" not in state:
            state["mean_square"] = torch.zeros_like(p)
        grad, beta = self.gradient(p, group), group["alpha"]
        mean_square = state["mean_square"].mul_(beta).addcmul_(grad, grad, value=1 - beta)
        p.addcdiv_(grad, mean_square.sqrt().add_(group["eps"]), value=-group["lr"])


@OPTIMIZERS.register("adam", help="Adam: bias-corrected first and second moments")
class Adam(_TableOptimizer):
    """Adam [Kingma and Ba 2015]:

        w_i ← w_i − η·M̂⁽¹⁾_i / (sqrt(M̂⁽²⁾_i) + ε),
        M⁽ᵐ⁾_i ← β_m·M⁽ᵐ⁾_i + (1 − β_m)·(∇w_i)ᵐ,    M̂⁽ᵐ⁾_i = M⁽ᵐ⁾_i / (1 − β_mᵗ)

    The table folds the bias correction into the recursion, M_t = (β·M_{t−1} + (1 − β)·gᵐ) /
    (1 − βᵗ); read literally, the corrected M_{t−1} is fed back and the corrections compound
    (after a few steps M⁽¹⁾ is no longer an average of gradients). The paper, and
    ``torch.optim.Adam``, keep the raw moments and divide only the copy used in the step, which
    is what is done here: the trajectories equal torch's (betas = (β₁, β₂)). A test runs the
    literal reading beside it to show that the correction's place is the whole difference.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        betas = (_check("betas[0]", beta1, 0.0, 1.0, open_high=True),
                 _check("betas[1]", beta2, 0.0, 1.0, open_high=True))
        eps = _check("eps", eps, 0.0)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def update(self, p, group, state):
        if "step" not in state:
            state["step"] = 0
            state["first_moment"] = torch.zeros_like(p)
            state["second_moment"] = torch.zeros_like(p)
        state["step"] += 1
        t, (beta1, beta2) = state["step"], group["betas"]
        grad = self.gradient(p, group)
        first = state["first_moment"].mul_(beta1).add_(grad, alpha=1 - beta1)
        second = state["second_moment"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        first_hat = first / (1 - beta1**t)
        second_hat = second / (1 - beta2**t)
        p.addcdiv_(first_hat, second_hat.sqrt_().add_(group["eps"]), value=-group["lr"])


# The library's own optimizer, registered beside the teaching ones: the default of a run
# (``--optimizer torch-sgd`` with ``--momentum``), so that runs compare against torch itself.
OPTIMIZERS.register("torch-sgd", torch.optim.SGD,
                    help="torch.optim.SGD with --momentum and --weight-decay (the library's own)")


def available_optimizers() -> list[str]:
    """The names ``make_optimizer`` (and ``--optimizer``) accept."""
    return OPTIMIZERS.names()


def optimizer_arguments(name: str) -> list[str]:
    """The keyword arguments optimizer ``name`` takes besides the parameters."""
    import inspect

    cls = _lookup(name)
    return [a for a in inspect.signature(cls.__init__).parameters if a not in ("self", "params")]


def settings_for(name: str, **settings) -> dict:
    """The subset of a run's optimizer settings (lr, momentum, weight_decay, ...) that optimizer
    ``name`` takes: a run has one ``--momentum`` whatever the optimizer, Adam does not use it."""
    taken = optimizer_arguments(name)
    return {key: value for key, value in settings.items() if key in taken}


def make_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """Optimizer ``name`` (one of :func:`available_optimizers`) over ``params``.

    Unknown names and arguments the optimizer does not take are ValueErrors naming them.
    """
    cls = _lookup(name)
    unknown = sorted(set(kwargs) - set(optimizer_arguments(name)))
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {unknown[0]!r}; "
                         f"it takes {', '.join(optimizer_arguments(name))}")
    return cls(params, **kwargs)


def _lookup(name: str):
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise ValueError(f"--optimizer {name!r}: unknown optimizer; choose one of "
                         f"{', '.join(available_optimizers())}")
    return OPTIMIZERS.get(name)


__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "OPTIMIZERS",
           "available_optimizers", "make_optimizer", "optimizer_arguments", "settings_for"]
