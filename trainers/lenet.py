"""The two LeNet architectures of SPEC §7, and the CNA paper's MLP, as PyTorch modules.

The LeNets are built exactly as the aIQ paper describes them (ELU, Glorot-uniform kernels). The
MLP (``mlp-5x500``) is the CNA paper's ([C], appendix): ``Flatten → 5 × (Linear(500) → ReLU) →
Linear(10)``, no regularisation, with PyTorch's default initialisation as its official code uses.

``build`` returns an ``nn.Sequential`` whose layers export to plain ONNX ops (Gemm/Conv, Elu,
MaxPool, Flatten, BatchNormalization), so the auditor finds each hidden layer as the input of an
``Elu``. The variants (``trainers.records.VARIANTS``) place the extra layer of each hidden block:

- ``batchnorm`` and ``dropout``: after the activation, as a Keras ``Dense(n, activation="elu")``
  followed by ``BatchNormalization()`` or ``Dropout(p)`` would;
- ``batchnorm-pre``: between the linear op and the activation (``Dense → BatchNorm → ELU``).
"""

from __future__ import annotations

from torch import nn

from trainers.records import CLASSES, INPUT_FEATURES, Architecture

# Keras BatchNormalization defaults: epsilon 1e-3, moving averages kept with momentum 0.99
# (PyTorch's ``momentum`` is the weight of the new batch, so 1 - 0.99).
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01


def _after_linear(architecture: Architecture, channels: int, conv: bool) -> list[nn.Module]:
    """What follows one hidden layer's linear op: the activation and the variant's extra layer."""
    norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
    activation = nn.ReLU() if architecture.activation == "relu" else nn.ELU()
    if architecture.variant == "batchnorm":
        return [activation, norm(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)]
    if architecture.variant == "batchnorm-pre":
        return [norm(channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM), activation]
    if architecture.variant == "dropout":
        return [activation, nn.Dropout(architecture.dropout_p)]
    return [activation]


def _glorot_init(model: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases (BatchNorm keeps its own defaults)."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def build(architecture: Architecture, inputs: int = INPUT_FEATURES) -> nn.Sequential:
    """A freshly initialised network; seed torch first.

    The LeNets take MNIST inputs shaped (N, 1, 28, 28); the MLP flattens any input of ``inputs``
    values per sample (784 for MNIST, 3072 for the Gaussian-noise set).
    """
    if architecture.arch == "mlp-5x500":
        layers = [nn.Flatten()]
        for n_in, n_out in zip((inputs, *architecture.widths[:-1]), architecture.widths, strict=True):
            layers += [nn.Linear(n_in, n_out), *_after_linear(architecture, n_out, conv=False)]
        return nn.Sequential(*layers, nn.Linear(architecture.widths[-1], CLASSES))
    if architecture.arch == "lenet-300-100":
        n1, n2 = architecture.widths
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(28 * 28, n1)]
        layers += _after_linear(architecture, n1, conv=False)
        layers += [nn.Linear(n1, n2), *_after_linear(architecture, n2, conv=False)]
        layers += [nn.Linear(n2, CLASSES)]
    else:
        n1, n2, n3 = architecture.widths
        layers = [nn.Conv2d(1, n1, 5), *_after_linear(architecture, n1, conv=True), nn.MaxPool2d(2, 2)]
        layers += [nn.Conv2d(n1, n2, 5), *_after_linear(architecture, n2, conv=True), nn.MaxPool2d(2, 2)]
        layers += [nn.Flatten(), nn.Linear(n2 * 4 * 4, n3), *_after_linear(architecture, n3, conv=False)]
        layers += [nn.Linear(n3, CLASSES)]
    model = nn.Sequential(*layers)
    _glorot_init(model)
    return model


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters, as the paper counts them (BatchNorm's running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kernel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The Dense/Conv weights: the only parameters Keras' ``l2(0.0005)`` regularises."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
