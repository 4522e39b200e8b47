"""Devices: which GPU a rank uses, bf16 autocast, and the 8-part time breakdown.

"Multi-GPU Optimization. Sync EASGD1, there are 8 potentially time-consuming parts: data
I/O; data and weight initialization; GPU-GPU parameter communication; CPU-GPU data
communication; CPU-GPU parameter communication; forward and backward propagation; GPU
weight update; CPU weight update" and "Sync EASGD2: put all training and test data on the
CPU, put all weights on GPU to reduce communication overhead" (Scaling Deep Learning on
GPU and Knights Landing Clusters, Algorithm 3).

``time_breakdown`` runs Algorithm 3 in one process with G workers (one per GPU, or G on
the one GPU there is, or on the CPU) and times each of the 8 parts, counting the bytes
that cross between host and device. On a machine without a GPU the parts that move data
between host and device, or update weights on a device, do not exist: they are reported
as ``None`` with the reason, never as a zero that looks measured.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch
from torch.nn import functional as F

PARTS = (
    ("io", "data I/O"),
    ("init", "data and weight initialization"),
    ("gpu_gpu_params", "GPU-GPU parameter communication"),
    ("cpu_gpu_data", "CPU-GPU data communication"),
    ("cpu_gpu_params", "CPU-GPU parameter communication"),
    ("fwd_bwd", "forward and backward propagation"),
    ("gpu_update", "GPU weight update"),
    ("cpu_update", "CPU weight update"),
)
NO_GPU = "does not exist here: no GPU, weights and data share host memory"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank_device(local_rank: int, prefer: str = "auto") -> torch.device:
    """``cuda:(local_rank % n)`` when there are n GPUs (and ``prefer`` is not cpu), else the CPU."""
    n = gpu_count()
    if prefer == "cuda" and n == 0:
        raise RuntimeError("--device cuda: no CUDA device is visible")
    if prefer == "cpu" or n == 0:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % n)


def device_note(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return "CPU (no CUDA device is visible)" if gpu_count() == 0 else "CPU (chosen)"


def bf16_autocast(device: torch.device, enabled: bool = True):
    """Autocast to bfloat16 on ``device`` (CUDA or CPU); a no-op context when disabled."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _Clock:
    """Seconds and bytes per part; on a GPU each part ends with a synchronize, so that the
    time of asynchronous kernels lands in the part that launched them."""

    def __init__(self, devices):
        self.seconds = {name: 0.0 for name, _ in PARTS}
        self.bytes = {name: 0 for name, _ in PARTS}
        self.cuda = [d for d in devices if d.type == "cuda"]

    @contextmanager
    def part(self, name: str, nbytes: int = 0):
        t0 = time.perf_counter()
        yield
        for d in self.cuda:
            torch.cuda.synchronize(d)
        self.seconds[name] += time.perf_counter() - t0
        self.bytes[name] += nbytes


def _vector(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def _set_vector(model, vector) -> None:
    torch.nn.utils.vector_to_parameters(vector, model.parameters())


def _worker_gradients(clock, data, models, locals_, devices, batch: int, generator, autocast: bool):
    """Steps 8-10 of Algorithm 3 on every worker: pick a batch, copy it, forward and backward."""
    grads, loss = [], torch.zeros(())
    for j, d in enumerate(devices):
        idx = torch.randint(len(data.y_train), (batch,), generator=generator)  # 8: CPU picks b samples
        x, y = data.x_train[idx], data.y_train[idx]
        if d.type == "cuda":  # 9: CPU copies them to GPU_j
            x_pin, y_pin = x.pin_memory(), y.pin_memory()
            with clock.part("cpu_gpu_data", x.numel() * x.element_size() + y.numel() * y.element_size()):
                x, y = x_pin.to(d, non_blocking=True), y_pin.to(d, non_blocking=True)
        with clock.part("fwd_bwd"), bf16_autocast(d, autocast):  # 10
            _set_vector(models[j], locals_[j])
            models[j].zero_grad()
            loss = F.cross_entropy(models[j](x), y)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in models[j].parameters()]))
    return grads, loss


def _describe_parts(clock, n_gpu: int, variant: int, workers: int) -> dict:
    """name -> {"label", "seconds", "bytes", "note"} of the 8 parts (seconds None where absent)."""
    on_gpu, parts = n_gpu > 0, {}
    for name, label in PARTS:
        seconds, note = clock.seconds[name], ""
        if not on_gpu and name in ("cpu_gpu_data", "cpu_gpu_params", "gpu_update"):
            seconds, note = None, NO_GPU
        elif not on_gpu and name == "gpu_gpu_params":
            note = "no GPU: the broadcast and the sum are copies in host memory"
        elif on_gpu and name == "cpu_gpu_params" and variant == 2:
            note = "Sync EASGD2: the weights stay on the device"
        elif on_gpu and name == "gpu_gpu_params" and n_gpu == 1:
            note = f"one GPU: the {workers} workers share it, the copies stay in its memory"
        parts[name] = {"label": label, "seconds": seconds, "bytes": clock.bytes[name], "note": note}
    return parts


def time_breakdown(variant: int = 2, workers: int = 2, steps: int = 30, batch: int = 64, lr: float = 0.05,
                   rho: float = 0.1, hidden=(256, 256), device: str = "auto", autocast: bool = False) -> dict:
    """Algorithm 3 (Sync EASGD1 or 2) on ``workers`` workers for ``steps`` steps, timed in
    the 8 parts. Variant 1 keeps the center W̄ on the CPU (its update is a CPU update and
    every step moves parameters between host and device); variant 2 keeps every weight on
    the device, so only the samples cross.

    Returns ``parts`` (name -> {"label", "seconds", "bytes", "note"}; seconds None where
    the part does not exist on this machine), ``devices``, ``final_loss`` and the bytes of
    parameters that crossed host<->device per step.
    """
    from ..algorithms.easgd import worker_update
    from ..data import load_digits
    from .reference import make_mlp

    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2, got {variant}")
    n_gpu = gpu_count() if device != "cpu" else 0
    devices = [torch.device("cuda", j % n_gpu) if n_gpu else torch.device("cpu") for j in range(workers)]
    clock = _Clock(devices)
    on_gpu = n_gpu > 0

    with clock.part("io"):  # 1: data I/O
        data = load_digits()
    with clock.part("init"):  # 1-5 of Algorithm 3: normalize on CPU, Xavier weights, copies
        model = make_mlp(hidden=hidden)
        w = _vector(model)
        locals_ = [w.to(d, copy=True) for d in devices]
        home = devices[0] if variant == 2 else torch.device("cpu")
        center = w.to(home, copy=True)
        models = [make_mlp(hidden=hidden).to(d) for d in devices]
    g = torch.Generator().manual_seed(0)
    nbytes = w.numel() * w.element_size()
    loss = torch.zeros(())
    for _ in range(steps):
        grads, loss = _worker_gradients(clock, data, models, locals_, devices, batch, g, autocast)
        # 11: GPU_1 broadcasts W̄ to all GPUs; 12: GPU_1 gets Σ_j W^j. With the center on the
        # CPU (variant 1) both cross between host and device instead.
        if variant == 2 or not on_gpu:
            with clock.part("gpu_gpu_params", 2 * nbytes * (workers - 1)):
                copies = [center.to(d) for d in devices]
                total = sum(lw.to(home) for lw in locals_)
        else:
            with clock.part("cpu_gpu_params", 2 * nbytes * workers):
                copies = [center.to(d) for d in devices]
                total = sum(lw.to(home) for lw in locals_)
        # 13: every worker updates its weights by equation (1), where they live
        with clock.part("gpu_update" if on_gpu else "cpu_update"):
            for j in range(workers):
                locals_[j] = worker_update(locals_[j], grads[j], copies[j], lr, rho)
        # 14: the center by equation (2): on the GPU (variant 2) or the CPU (variant 1)
        with clock.part("gpu_update" if (on_gpu and variant == 2) else "cpu_update"):
            center = center + lr * rho * (total - workers * center)
    parts = _describe_parts(clock, n_gpu, variant, workers)
    return {"variant": variant, "workers": workers, "steps": steps, "devices": [str(d) for d in devices],
            "device_note": device_note(devices[0]), "parts": parts, "final_loss": float(loss.detach()),
            "param_bytes_host_device_per_step": clock.bytes["cpu_gpu_params"] / steps}


def format_breakdown(result: dict) -> str:
    lines = [f"Sync EASGD{result['variant']}, {result['workers']} workers on {result['device_note']}, "
             f"{result['steps']} steps"]
    total = sum(p["seconds"] or 0.0 for p in result["parts"].values())
    for i, part in enumerate(result["parts"].values(), start=1):
        if part["seconds"] is None:
            lines.append(f"{i}. {part['label']:<36} {'-':>9}         {part['note']}")
        else:
            share = part["seconds"] / total if total else 0.0
            lines.append(f"{i}. {part['label']:<36} {part['seconds'] * 1000:8.1f} ms {share:6.1%} "
                         f"{part['bytes'] / 2**20:8.2f} MiB  {part['note']}")
    return "\n".join(lines)
