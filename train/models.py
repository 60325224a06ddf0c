"""Model architectures the trainer offers: a small CNN, a MobileNetV2-style network and an MLP."""

from __future__ import annotations

from typing import Any

from edgeml._deps import require

__all__ = ["mlp", "mobilenet_v2", "small_cnn"]


def _nn() -> Any:
    return require("torch.nn", "train")


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> Any:
    """Two conv blocks and a linear classifier; fits 8x8 digits to 32x32 images."""
    nn = _nn()
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def _divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def _conv_bn(nn: Any, cin: int, cout: int, stride: int, groups: int = 1, kernel: int = 3, act: bool = True) -> Any:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3) -> Any:
    """A MobileNetV2-style network (inverted residuals, depthwise convs, ReLU6), any input size >= 32."""
    nn = _nn()

    class InvertedResidual(nn.Module):  # type: ignore[name-defined]
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers = [_conv_bn(nn, cin, hidden, 1, kernel=1)] if expand != 1 else []
            layers += [_conv_bn(nn, hidden, hidden, stride, groups=hidden),
                       _conv_bn(nn, hidden, cout, 1, kernel=1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            return x + self.block(x) if self.residual else self.block(x)

    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    cin = _divisible(32 * width_mult)
    last = _divisible(1280 * max(1.0, width_mult))
    layers = [_conv_bn(nn, in_channels, cin, 2)]
    for t, c, n, s in settings:
        cout = _divisible(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    layers += [_conv_bn(nn, cin, last, 1, kernel=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))


def mlp(in_features: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (64, 32)) -> Any:
    """A multilayer perceptron for tabular data."""
    nn = _nn()
    layers: list[Any] = []
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)
