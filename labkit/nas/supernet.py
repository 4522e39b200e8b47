"""The over-parameterized network of ProxylessNAS (Cai, Zhu, Han, ICLR 2019).

Each searchable block is a *mixed operation* over N candidate operations
(MBConv-style inverted residuals with kernel 3/5/7 and expansion 3/6, and ``zero`` where
the block keeps its shape, so that the block can be skipped), weighted by architecture
parameters α (one vector per block). Instead of running every candidate (DARTS), the
supernet *binarizes* the paths:

* equation (2): binary gates g = binarize(p_1..p_N), g = e_i with probability p_i = softmax(α)_i;
* equation (3): the mixed operation outputs Σ g_i o_i(x) = o_i(x): only the sampled path runs,
  so only its activations are kept in memory.

Training alternates: the weights are trained with one path sampled per block (``mode="weights"``);
α is trained on held-out data with *two* paths sampled per block (``mode="arch"``): the pair is
drawn from p, its probabilities re-normalized, one of the two is made active, and the gradient
reaches α through the gates, ∂L/∂α_i = Σ_j ∂L/∂g_j · p_j (δ_ij − p_i) (the paper's section 3.2.1),
with ∂L/∂g_j = <∂L/∂y, o_j(x)>. After the α step the two updated entries are shifted so that the
paths that were not sampled keep their probabilities (:meth:`MixedOp.rescale_pair`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The candidate operations: MBConv with kernel k and expansion ratio e, and zero.
MBCONV = tuple((f"k{k}e{e}", k, e) for k in (3, 5, 7) for e in (3, 6))
CANDIDATES = tuple(name for name, _, _ in MBCONV) + ("zero",)
MODES = ("weights", "arch", "full", "fixed")


class MBConv(nn.Module):
    """Inverted residual without its shortcut: 1x1 expand, kxk depthwise, 1x1 project (MobileNetV2)."""

    def __init__(self, cin: int, cout: int, kernel: int, expansion: int, stride: int):
        super().__init__()
        mid = cin * expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return self.body(x)


class Zero(nn.Module):
    """The zero operation: the block adds nothing to its shortcut (the block is skipped)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if stride != 1 or cin != cout:
            raise ValueError("zero needs a block that keeps its shape (stride 1, cin == cout)")

    def forward(self, x):
        return x.new_zeros(x.shape)


def make_op(name: str, cin: int, cout: int, stride: int) -> nn.Module:
    if name == "zero":
        return Zero(cin, cout, stride)
    for candidate, k, e in MBCONV:
        if candidate == name:
            return MBConv(cin, cout, k, e, stride)
    raise ValueError(f"unknown operation {name!r}; choose one of {', '.join(CANDIDATES)}")


def candidates_for(cin: int, cout: int, stride: int) -> tuple[str, ...]:
    """The candidates of a block: zero only where the shapes allow a shortcut."""
    keeps_shape = stride == 1 and cin == cout
    return CANDIDATES if keeps_shape else CANDIDATES[:-1]


class MixedOp(nn.Module):
    """One searchable block: N candidate paths, architecture parameters α, binary gates."""

    def __init__(self, cin: int, cout: int, stride: int, candidates: tuple[str, ...] | None = None):
        super().__init__()
        self.candidates = tuple(candidates or candidates_for(cin, cout, stride))
        self.ops = nn.ModuleList(make_op(name, cin, cout, stride) for name in self.candidates)
        self.alpha = nn.Parameter(torch.zeros(len(self.candidates)))  # all paths equally likely at first
        self.shortcut = stride == 1 and cin == cout
        self.mode = "weights"
        self.fixed: int | None = None  # the path of mode "fixed"
        self.active: list[int] = []  # the paths run by the last forward pass
        self.gates: torch.Tensor | None = None  # the gates of the last forward pass (mode "arch")
        self.pair: list[int] | None = None

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def sample_gate(self, generator=None) -> int:
        """Equation (2): the index i whose gate is 1, drawn with probability p_i."""
        return int(torch.multinomial(self.probs().detach(), 1, generator=generator))

    def forward(self, x):
        if self.mode == "full":  # every path, weighted by p: the DARTS-style reference
            p = self.probs()
            self.active = list(range(len(self.ops)))
            out = sum(p[i] * op(x) for i, op in enumerate(self.ops))
        elif self.mode in ("weights", "fixed"):  # equation (3): only the sampled path runs
            i = self.fixed if self.mode == "fixed" else self.sample_gate()
            self.active = [i]
            out = self.ops[i](x)
        else:  # "arch": two sampled paths, gradient to α through the binary gates
            probs = self.probs().detach()
            pair = torch.multinomial(probs, 2, replacement=False).tolist()
            p_pair = torch.softmax(self.alpha[pair], dim=0)
            chosen = int(torch.multinomial(p_pair.detach(), 1))
            onehot = torch.zeros(2)
            onehot[chosen] = 1.0
            # value: the binary gates; gradient: ∂g_j/∂α_i = ∂p_j/∂α_i (p over the pair)
            gates = onehot + p_pair - p_pair.detach()
            self.pair, self.gates, self.active = pair, gates, pair
            out = gates[0] * self.ops[pair[0]](x) + gates[1] * self.ops[pair[1]](x)
        return x + out if self.shortcut else out

    @torch.no_grad()
    def rescale_pair(self, old_alpha: torch.Tensor) -> None:
        """Shift the two updated α so that the sum of their exponentials is unchanged:
        the paths that were not sampled keep their probabilities."""
        if self.pair is None:
            return
        pair = self.pair
        offset = torch.logsumexp(self.alpha[pair], 0) - torch.logsumexp(old_alpha[pair], 0)
        self.alpha[pair] -= offset

    def chosen(self) -> str:
        return self.candidates[int(self.alpha.argmax())]


# --- the network for digits (and CIFAR-10) -------------------------------------------------
def default_layout(input_shape) -> list[tuple[int, int, int]]:
    """(cin, cout, stride) of each searchable block, for an input of shape (C, H, W)."""
    c, h, _ = input_shape
    if h <= 8:  # digits: 8x8
        return [(8, 16, 1), (16, 16, 1), (16, 24, 2), (24, 24, 1)]
    return [(16, 24, 2), (24, 24, 1), (24, 40, 2), (40, 40, 1), (40, 80, 2), (80, 80, 1)]


class SuperNet(nn.Module):
    """Stem, the searchable blocks, head. ``mode`` sets how every MixedOp runs."""

    def __init__(self, input_shape, num_classes: int, layout=None, stem_channels: int = 8):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.layout = [tuple(b) for b in (layout or default_layout(input_shape))]
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], stem_channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU6(inplace=True))
        self.blocks = nn.ModuleList(MixedOp(cin, cout, s) for cin, cout, s in self.layout)
        last = self.layout[-1][1]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        for block in self.blocks:
            block.mode = mode

    def arch_parameters(self) -> list[nn.Parameter]:
        return [b.alpha for b in self.blocks]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def block_inputs(self) -> list[tuple[int, int, int]]:
        """(C, H, W) each block sees, for a batch of one."""
        shapes = []
        h, w = self.input_shape[1:]
        for cin, _, stride in self.layout:
            shapes.append((cin, h, w))
            h, w = math.ceil(h / stride), math.ceil(w / stride)
        return shapes

    def derive(self) -> list[str]:
        """The architecture: the most likely path of each block (argmax α)."""
        return [b.chosen() for b in self.blocks]


class ChildNet(nn.Module):
    """A derived architecture as a plain network: one operation per block, nothing else kept."""

    def __init__(self, input_shape, num_classes: int, architecture: list[str], layout=None,
                 stem_channels: int = 8):
        super().__init__()
        layout = [tuple(b) for b in (layout or default_layout(input_shape))]
        if len(architecture) != len(layout):
            raise ValueError(f"the architecture has {len(architecture)} blocks, the layout {len(layout)}")
        self.architecture = list(architecture)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], stem_channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_channels), nn.ReLU6(inplace=True))
        blocks = []
        for name, (cin, cout, stride) in zip(architecture, layout):
            if name not in candidates_for(cin, cout, stride):
                raise ValueError(f"{name!r} is not a candidate of a block {cin}->{cout} stride {stride}")
            blocks.append(child_block(name, cin, cout, stride))
        self.blocks = nn.Sequential(*blocks)
        last = layout[-1][1]
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def child_block(name: str, cin: int, cout: int, stride: int) -> nn.Module:
    """One block of a derived network as it runs there: the operation and its shortcut (zero
    with a shortcut: the identity). The latency table times exactly this module."""
    return _Fixed(make_op(name, cin, cout, stride), stride == 1 and cin == cout, name == "zero")


class _Fixed(nn.Module):
    def __init__(self, op, shortcut: bool, skip: bool):
        super().__init__()
        self.op, self.shortcut, self.skip = op, shortcut, skip

    def forward(self, x):
        if self.skip:  # zero + shortcut: the block is the identity, nothing runs
            return x
        out = self.op(x)
        return x + out if self.shortcut else out


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass of ``model`` on ``x``:
    the memory the paths that ran hold (equation (3): one path instead of N)."""
    total = 0
    seen: set[int] = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr())
        if key not in seen:  # a tensor saved twice is held once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total
