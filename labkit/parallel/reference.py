"""The single-process run every parallelism is checked against.

``make_mlp`` builds the same model on every rank (an MLP with four linear layers, so that
up to four pipeline stages or a column/row pair per stage fit), ``digits_batches`` gives
every rank the same global batches, ``train_single`` trains the whole model in one process,
and ``assemble`` puts the pieces of a parallel run's gradients back together.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..data import load_digits
from ..models import MLP, xavier_init

HIDDEN = (64, 64, 64)


def make_mlp(seed: int = 0, hidden=HIDDEN, input_shape=(1, 8, 8), classes: int = 10):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return xavier_init(MLP(input_shape, classes, hidden=hidden))


def digits_batches(batch: int, steps: int, seed: int = 0):
    """``steps`` global batches of the digits training set, the same on every rank."""
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.y_train), generator=g)
    per_epoch = len(order) // batch
    for step in range(steps):
        if step and step % per_epoch == 0:
            order = torch.randperm(len(data.y_train), generator=g)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        yield data.x_train[idx], data.y_train[idx]


def train_single(steps: int, batch: int, lr: float, model=None) -> dict:
    """Losses of every step and the gradients of the first, on one process."""
    model = model or make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    out = {"losses": []}
    for step, (x, y) in enumerate(digits_batches(batch, steps), start=1):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        out["losses"].append(float(loss.detach()))
        if step == 1:
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
    out["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def assemble(pieces: list[dict]) -> dict:
    """Full tensors from the ranks' ``local_gradients()``: slices are concatenated in order
    of their index; a whole tensor found on several ranks must be the same on each
    (ValueError otherwise), so replicas that drifted apart do not go unnoticed."""
    whole: dict[str, torch.Tensor] = {}
    slices: dict[str, dict] = {}
    for rank_pieces in pieces:
        for name, (tensor, shard) in rank_pieces.items():
            if shard is None:
                if name in whole and not torch.allclose(whole[name], tensor, rtol=0, atol=1e-6):
                    raise ValueError(f"{name}: the copies on different ranks differ")
                whole[name] = tensor
            else:
                dim, index, count = shard
                known = slices.setdefault(name, {"dim": dim, "count": count, "parts": {}})
                if index in known["parts"] and not torch.allclose(known["parts"][index], tensor, rtol=0, atol=1e-6):
                    raise ValueError(f"{name}: slice {index} differs between ranks")
                known["parts"][index] = tensor
    for name, known in slices.items():
        if sorted(known["parts"]) != list(range(known["count"])):
            raise ValueError(f"{name}: slices {sorted(known['parts'])} of {known['count']}")
        whole[name] = torch.cat([known["parts"][i] for i in range(known["count"])], dim=known["dim"])
    return whole
