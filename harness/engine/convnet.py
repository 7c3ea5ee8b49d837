"""A small fixed convolutional network (pure torch, so no change to the harness or to timm moves it): the reference
workload that trials time for their relative throughput (harness.engine.reference), and the step that probes whether
bf16 is native on a CPU (harness.engine.precision)."""

from torch import nn


def reference_network() -> nn.Module:
    layers, cin = [], 3
    for cout, stride in ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
