"""The compression dashboard: every compressor's error against the bytes it sends.

The gradients are real: a labkit model (``labkit.models``) trains on digits with plain SGD
for a few steps, and each step's gradient, parameter by parameter, is what the
compressors of :mod:`labkit.compress` get. Each compressor compresses the same sequence
twice, with error feedback (the residual of a step is added to the next gradient) and
without; for each it reports

- bytes: the packets' size per step (headers included), against the 4 bytes per value of
  float32;
- error after t steps: ``||sum of decompressed gradients - sum of gradients|| / ||sum of
  gradients||``, the error of the update the model has received by then. Error feedback
  cannot make one step better; it keeps what was dropped and sends it later, so its
  error over several steps stays bounded where the plain compressor's accumulates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compress import available_compressors, make_compressor
from .common import STYLE, figure, picture, png, status_line

STEPS = 10
BATCH = 64
RATIOS = (0.001, 0.01, 0.1)
SPARSE = ("topk", "randomk", "dgc")  # the compressors whose ``ratio`` the ratio control sets


def real_gradients(model_name: str = "lenet", steps: int = STEPS, batch: int = BATCH, seed: int = 0,
                   lr: float = 0.05) -> dict:
    """``{"names", "steps": [[grad per parameter] per step], "params"}`` from SGD on digits."""
    from ..data import load_dataset
    from ..models import build_model

    data = load_dataset("digits")
    model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(data.y_train), (batch,), generator=g)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
        with torch.no_grad():  # plain SGD by hand: torch.optim's first step imports torch._dynamo (seconds)
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
    return {"model": model_name, "names": names, "steps": out,
            "params": sum(p.numel() for p in model.parameters())}


def build(name: str, error_feedback: bool, ratio: float):
    params = {}
    if name in SPARSE:
        params["ratio"] = ratio
    if name == "dgc":
        params["warmup_steps"] = 0  # measured at its final density
    return make_compressor(name, error_feedback=error_feedback, **params)


def evaluate(name: str, grads: dict, error_feedback: bool, ratio: float = 0.01) -> dict:
    """Bytes per step and the error of the summed update after each step, for one compressor."""
    compressor = build(name, error_feedback, ratio)
    true_sum = [torch.zeros_like(g) for g in grads["steps"][0]]
    sent_sum = [torch.zeros_like(g) for g in grads["steps"][0]]
    errors, one_step, nbytes = [], [], []
    for step in grads["steps"]:
        step_bytes, err2, norm2 = 0, 0.0, 0.0
        for i, (key, g) in enumerate(zip(grads["names"], step)):
            packet = compressor.compress(g, key=key)
            approx = compressor.decompress(packet)
            step_bytes += packet.nbytes
            err2 += float(((approx - g) ** 2).sum())
            norm2 += float((g ** 2).sum())
            true_sum[i] += g
            sent_sum[i] += approx
        nbytes.append(step_bytes)
        one_step.append((err2 / norm2) ** 0.5 if norm2 else 0.0)
        num = sum(float(((s - t) ** 2).sum()) for s, t in zip(sent_sum, true_sum))
        den = sum(float((t ** 2).sum()) for t in true_sum)
        errors.append((num / den) ** 0.5 if den else 0.0)
    return {"compressor": name, "error_feedback": error_feedback, "bytes_per_step": sum(nbytes) / len(nbytes),
            "error_after": errors, "one_step_error": one_step}


def evaluate_all(grads: dict, ratio: float = 0.01, names=None) -> list[dict]:
    names = names or available_compressors()
    return [evaluate(n, grads, ef, ratio) for n in names for ef in (False, True)]


def tradeoff_png(results: list[dict], grads: dict, steps: int, focus: str) -> bytes:
    """Left: error after ``steps`` steps against bytes per step, every compressor, with and
    without error feedback. Right: ``focus``'s error as the steps go."""
    fig = figure(11, 4.6)
    ax, curve = fig.subplots(1, 2, gridspec_kw=dict(left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.25,
                                                    width_ratios=(1.5, 1)))
    full = 4 * grads["params"]
    fig.suptitle(f"real gradients of {grads['model']} on digits ({grads['params']} values, "
                 f"{full / 1024:.1f} KB in float32 per step)")
    names = sorted({r["compressor"] for r in results}, key=[r["compressor"] for r in results].index)
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        pair = {r["error_feedback"]: r for r in results if r["compressor"] == name}
        xs = [pair[ef]["bytes_per_step"] for ef in (False, True)]
        ys = [max(pair[ef]["error_after"][steps - 1], 1e-7) for ef in (False, True)]
        ax.plot(xs, ys, "-", color=color, lw=0.8)
        ax.plot(xs[0], ys[0], "o", mfc="white", color=color)
        ax.plot(xs[1], ys[1], "o", color=color)
        ax.annotate(name, (xs[1], ys[1]), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax.axvline(full, color="gray", ls=":", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="bytes sent per step (log)",
           ylabel=f"relative error of the summed update after {steps} step(s)",
           title="filled: with error feedback; hollow: without")
    ax.grid(alpha=0.3, which="both")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    for ef, style in ((False, "--"), (True, "-")):
        r = next(r for r in results if r["compressor"] == focus and r["error_feedback"] == ef)
        curve.plot(range(1, len(r["error_after"]) + 1), r["error_after"], style,
                   label="error feedback" if ef else "no error feedback")
    curve.axvline(steps, color="gray", ls=":", lw=1)
    curve.set(xlabel="steps", ylabel="relative error of the summed update", title=focus, ylim=(0, None))
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    return png(fig)


class CompressionDashboard:
    def __init__(self, model: str = "lenet"):
        import ipywidgets as w

        self.status = status_line()
        self.model = w.Dropdown(options=["lenet", "mlp"], value=model, description="model", style=STYLE,
                                tooltip="the labkit model whose real gradients are compressed")
        self.ratio = w.SelectionSlider(options=list(RATIOS), value=0.01, description="ratio", style=STYLE,
                                       tooltip="share of values kept by topk, randomk and dgc")
        self.steps = w.IntSlider(value=1, min=1, max=STEPS, description="steps", style=STYLE,
                                 tooltip="error of the update summed over this many steps")
        self.focus = w.Dropdown(options=available_compressors(), value="topk", description="curve", style=STYLE,
                                tooltip="the compressor drawn on the right")
        self.plot = picture("compression")
        self.grads = {}
        self.results = {}
        for control in (self.model, self.ratio):
            control.observe(lambda _: self.recompute(), "value")
        for control in (self.steps, self.focus):
            control.observe(lambda _: self.draw(), "value")
        self.recompute()
        self.widget = w.VBox([w.HBox([self.model, self.ratio]), w.HBox([self.steps, self.focus]),
                              self.status, self.plot])

    def recompute(self):
        key = (self.model.value, self.ratio.value)
        if key not in self.results:
            self.status.value = "compressing..."
            if self.model.value not in self.grads:
                self.grads[self.model.value] = real_gradients(self.model.value)
            self.results[key] = evaluate_all(self.grads[self.model.value], self.ratio.value)
        self.status.value = ""
        self.draw()

    def draw(self):
        key = (self.model.value, self.ratio.value)
        self.plot.value = tradeoff_png(self.results[key], self.grads[self.model.value], self.steps.value,
                                       self.focus.value)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
