"""The model zoo: an MLP, a LeNet-style CNN and a small ResNet.

Weights are filled with Xavier initialization (step 2 of Algorithm 3 in "Scaling Deep
Learning on GPU and Knights Landing Clusters": "Initialize W on CPU: random and Xavier
weight filling"). Every model adapts to the input shape of the dataset it is built for.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS


def xavier_init(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights, zero biases, identity batch norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@MODELS.register("mlp", help="multilayer perceptron: flatten, 128, 64, classes (ReLU)")
class MLP(nn.Sequential):
    def __init__(self, input_shape, num_classes, hidden=(128, 64)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(input_shape).prod())
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


@MODELS.register("lenet", help="LeNet-style CNN: two conv+pool stages, then 120, 84, classes")
class LeNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 16 * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al., 2016)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@MODELS.register("resnet", help="small ResNet: 3 stages of basic blocks (16, 32, 64 channels)")
class ResNet(nn.Module):
    def __init__(self, input_shape, num_classes, widths=(16, 32, 64)):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build_model(name: str, input_shape, num_classes: int, seed: int | None = None) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W), Xavier-initialized.

    With ``seed`` the initial weights depend only on the seed (every rank builds the same).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return xavier_init(MODELS.get(name)(tuple(input_shape), num_classes))
    return xavier_init(MODELS.get(name)(tuple(input_shape), num_classes))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model: nn.Module, input_shape) -> int:
    """Forward-pass FLOPs for one sample (a multiply-add counts 2), of convs and linears.

    Counted from the layer shapes seen in one forward pass; the test suite checks it
    against torch.utils.flop_counter.
    """
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            cin = module.in_channels // module.groups
            kh, kw = module.kernel_size
            total += 2 * cin * kh * kw * output[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def describe(model: nn.Module, input_shape) -> str:
    return (f"{type(model).__name__}: {parameter_count(model):,} parameters, "
            f"{flops_per_sample(model, input_shape):,} FLOPs per sample (forward)")
