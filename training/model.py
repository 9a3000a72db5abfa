"""A small residual CNN for grey films, trained from scratch (no pretrained weights exist here).

Each stage halves the resolution with a strided 3x3 convolution and refines with one residual block; global average
pooling and a linear head give the logits. At 128 px with widths (16, 32, 64, 128, 192) that is about 0.6 M
parameters and ~60 M multiply-adds per film: a few milliseconds on one CPU core, which is what lets every detector run
on every film. :meth:`FilmNet.embed` exposes the pooled features for score detectors (e.g. out-of-distribution
distance) that build on a trained backbone.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(x + y)


class FilmNet(nn.Module):
    """(N, 1, S, S) float32 -> (N, num_outputs) logits (or one score)."""

    def __init__(self, num_outputs: int, widths: tuple[int, ...] = (16, 32, 64, 128, 192), dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(1, widths[0], stride=2)]
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv_bn(cin, cout, stride=2), ResidualBlock(cout)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ResidualBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity: stable from-scratch training

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))


class MirrorSwap(nn.Module):
    """A two-label left-right task made exactly consistent: ``f(fliplr x) == f(x)[:, ::-1]``.

    The logits are the mean of the network's logits on the film and the swapped logits on its mirror image. A film and
    its mirror image therefore get complementary probabilities (of the two, exactly one is called flipped at a 0.5
    threshold), and the network's own left-right biases (a marker, a tube) cancel. It costs a second forward pass.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + torch.flip(self.net(torch.flip(x, dims=[3])), dims=[1])) / 2


def build_model(num_outputs: int, widths: tuple[int, ...], dropout: float) -> FilmNet:
    return FilmNet(num_outputs, tuple(widths), dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A biased convolution computing conv followed by (eval-mode) BatchNorm ``bn``."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    with torch.no_grad():
        w = conv.weight
        b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        if isinstance(bn, nn.BatchNorm2d):
            k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w, b = w * k[:, None, None, None], (b - bn.running_mean) * k + bn.bias
        out.weight.copy_(w)
        out.bias.copy_(b)
    return out


def fold_batchnorm(net: FilmNet) -> FilmNet:
    """The same function with every BatchNorm folded into the convolution before it (in place; returns ``net``).

    That is the network as the ONNX exporter writes it: biased convolutions, no BatchNorm. It can be fine-tuned
    (no batch statistics then: small learning rates) and exported again to the same kind of graph.
    """
    for layer in net.features:
        if isinstance(layer, ResidualBlock):
            layer.conv1, layer.bn1 = _fold(layer.conv1, layer.bn1), nn.Identity()
            layer.conv2, layer.bn2 = _fold(layer.conv2, layer.bn2), nn.Identity()
        else:
            layer[0], layer[1] = _fold(layer[0], layer[1]), nn.Identity()
    return net


def filmnet_from_onnx(path: str, widths: tuple[int, ...] = (16, 32, 64, 128, 192), dropout: float = 0.1) -> FilmNet:
    """A shipped detector's network rebuilt from its ONNX file (eval mode), for building on it without its run folder.

    The exporter folds each BatchNorm into the convolution before it, so the rebuilt network is
    :func:`fold_batchnorm`'s structure: exactly the shipped function, and exporting it again gives the very same
    kernels. The convolutions are matched in graph order, which is the order of ``FilmNet.features``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [(init[n.input[1]], init[n.input[2]]) for n in graph.node if n.op_type == "Conv"]
    head_w, head_b = init["head.weight"], init["head.bias"]
    net = fold_batchnorm(FilmNet(int(head_w.shape[0]), widths, dropout).eval())
    targets = [m for m in net.features.modules() if isinstance(m, nn.Conv2d)]
    if len(targets) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions, FilmNet{tuple(widths)} has {len(targets)}")
    with torch.no_grad():
        for conv, (w, b) in zip(targets, convs, strict=True):
            if tuple(w.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: convolution {w.shape} does not fit FilmNet{tuple(widths)}")
            conv.weight.copy_(torch.from_numpy(w.copy()))
            conv.bias.copy_(torch.from_numpy(b.copy()))
        net.head.weight.copy_(torch.from_numpy(head_w.copy()))
        net.head.bias.copy_(torch.from_numpy(head_b.copy()))
    return net.eval()
