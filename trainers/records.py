"""The typed records that cross the trainer's modules: what to train, and what training gave.

``Architecture``, ``Recipe`` and ``TrainingJob`` say what a network is and how it is trained (SPEC §7);
``TrainedNetwork`` adds what training measured. Each record has one flat form, spelled only
here: a manifest line (JSON values) and the ONNX ``metadata_props`` (strings), so a grid's
manifest and a folder of exported networks read back as the same records. PyTorch is not
imported: the grid report reads these records without it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from auditor.errors import AuditError, require

ARCHS = {"lenet-300-100": 2, "lenet-5": 3, "mlp-5x500": 5}  # architecture -> number of hidden widths
MAX_WIDTH = 16384  # a hidden layer's neurons or channels: 32 times the widest network the papers train
# Widths an architecture takes when none are given: the CNA paper's MLP is 5 hidden layers of 500.
DEFAULT_WIDTHS = {"mlp-5x500": (500,) * 5}
# What the label noise of a job does to the chosen fraction of training labels (SPEC §7, [C]):
# "random" resamples each from all classes (the aIQ paper), "shuffled" permutes them among
# themselves (the CNA paper), which keeps the class counts.
LABEL_NOISE_KINDS = ("random", "shuffled")
INPUT_FEATURES = 28 * 28  # what Architecture.parameter_count assumes for the MLP's input
# Where BatchNorm or Dropout sits in each hidden block (SPEC §7): "batchnorm" and "dropout" follow
# the activation, as Keras Dense(n, activation="elu") then BatchNormalization() would;
# "batchnorm-pre" normalises between the linear op and the activation (Dense → BatchNorm → ELU).
VARIANTS = ("none", "batchnorm", "batchnorm-pre", "dropout")
CLASSES = 10
TRAINER = "auditor-train"


@dataclass(frozen=True)
class Architecture:
    """What fixes a network's shape: the architecture, its hidden widths, and the variant."""

    arch: str
    widths: tuple[int, ...]
    variant: str = "none"
    dropout_p: float = 0.5

    def __post_init__(self) -> None:
        require([(self.arch in ARCHS, f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")])
        expected = ARCHS[self.arch]
        require(
            [
                (
                    len(self.widths) == expected,
                    f"{self.arch} takes {expected} widths, got {len(self.widths)} ({self.widths_text})",
                ),
                (
                    all(1 <= w <= MAX_WIDTH for w in self.widths),
                    f"widths must be whole numbers in 1..{MAX_WIDTH}, got {self.widths_text}",
                ),
                (self.variant in VARIANTS, f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"),
                (0 <= self.dropout_p < 1, f"dropout p must be in [0, 1), got {self.dropout_p}"),
            ]
        )

    @property
    def widths_text(self) -> str:
        """The widths as the CLI writes them, e.g. ``11,4``."""
        return ",".join(str(w) for w in self.widths)

    @property
    def parameter_count(self) -> int:
        """Trainable parameters, counted in closed form as the paper counts them.

        BatchNorm adds a scale and a shift per neuron; its running statistics are not parameters.
        The tests check this against the PyTorch module that ``trainers.lenet.build`` makes. The
        MLP is counted for 28×28 inputs (``INPUT_FEATURES``); a network's own count is ``params``.
        """
        if self.arch == "lenet-300-100":
            n1, n2 = self.widths
            count = (28 * 28 + 1) * n1 + (n1 + 1) * n2 + (n2 + 1) * CLASSES
        elif self.arch == "mlp-5x500":
            sizes = (INPUT_FEATURES, *self.widths, CLASSES)
            count = sum((n_in + 1) * n_out for n_in, n_out in itertools.pairwise(sizes))
        else:
            n1, n2, n3 = self.widths
            count = (25 + 1) * n1 + (25 * n1 + 1) * n2 + (n2 * 16 + 1) * n3 + (n3 + 1) * CLASSES
        return count + (2 * sum(self.widths) if self.variant.startswith("batchnorm") else 0)

    @property
    def activation(self) -> str:
        """The hidden activation: ELU for the LeNets (aIQ paper), ReLU for the MLP (CNA paper's code)."""
        return "relu" if self.arch == "mlp-5x500" else "elu"

    @property
    def init(self) -> str:
        """How weights start: Keras' Glorot-uniform for the LeNets, PyTorch's default for the MLP."""
        return "pytorch-default" if self.arch == "mlp-5x500" else "glorot-uniform"


@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters of SPEC §7; every one can be overridden from the CLI.

    ``patience`` None trains for exactly ``max_epochs`` (no early stopping), as the CNA paper does.
    """

    lr: float = 0.001
    momentum: float = 0.9
    l2: float = 0.0005
    batch_size: int = 32
    patience: int | None = 5
    max_epochs: int | None = None
    restore_best: bool = False
    nesterov: bool = True

    def __post_init__(self) -> None:
        require(
            [
                (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
                (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
                (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                (self.patience is None or self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
                (
                    self.max_epochs is None or self.max_epochs >= 1,
                    f"max epochs must be >= 1, got {self.max_epochs}",
                ),
                (self.patience is not None or self.max_epochs is not None, "without early stopping, give max epochs"),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def optimizer(self) -> str:
        return "sgd-nesterov" if self.nesterov else "sgd-momentum"


# The recipes ``--recipe`` names. "lenet" is the aIQ paper's (SPEC §7); "cna" is the CNA paper's MLP
# recipe ([C], appendix): SGD lr 0.05, momentum 0.8, no regularisation, 100 epochs (label-noise runs
# CNA_NOISY_EPOCHS), batch 128 and no early stopping as in its official code.
RECIPES = {
    "lenet": Recipe(),
    "cna": Recipe(lr=0.05, momentum=0.8, l2=0.0, batch_size=128, patience=None, max_epochs=100, nesterov=False),
}
CNA_NOISY_EPOCHS = 200


@dataclass(frozen=True)
class TrainingJob:
    """Everything that determines one trained network; equal jobs give equal weights on one machine."""

    architecture: Architecture
    seed: int = 0
    label_noise: float = 0.0
    recipe: Recipe = field(default_factory=Recipe)
    dataset: str = "mnist"
    limit: int | None = None
    label_noise_kind: str = "random"
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        if self.label_noise == 0:  # clean labels are clean whatever the kind of noise asked for
            object.__setattr__(self, "label_noise_kind", "random")
        require(
            [
                (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
                (0 <= self.label_noise <= 1, f"label-noise fraction must be in [0, 1], got {self.label_noise}"),
                (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
                (
                    self.label_noise_kind in LABEL_NOISE_KINDS,
                    f"unknown label noise {self.label_noise_kind!r}; choose one of {', '.join(LABEL_NOISE_KINDS)}",
                ),
                (
                    self.checkpoint_every is None or self.checkpoint_every >= 1,
                    f"checkpoint interval must be >= 1, got {self.checkpoint_every}",
                ),
            ]
        )

    @property
    def name(self) -> str:
        """A predictable file stem, e.g. ``lenet-300-100_w11-4_none_n0_s0``; shuffled labels are ``sh0.1``."""
        a = self.architecture
        widths = "-".join(str(w) for w in a.widths)
        noise = "sh" if self.label_noise_kind == "shuffled" else "n"
        return f"{a.arch}_w{widths}_{a.variant}_{noise}{self.label_noise:g}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The job as flat JSON-ready values (manifest lines compare these on resume)."""
        a = self.architecture
        return {
            "arch": a.arch,
            "widths": list(a.widths),
            "variant": a.variant,
            "dropout_p": a.dropout_p,
            "seed": self.seed,
            "label_noise": self.label_noise,
            "dataset": self.dataset,
            "limit": self.limit,
            "label_noise_kind": self.label_noise_kind,
            "checkpoint_every": self.checkpoint_every,
            **self.recipe.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingJob:
        """The job of a ``to_dict`` result (extra keys are ignored; a missing one raises ``KeyError``)."""
        architecture = Architecture(
            values["arch"], tuple(int(w) for w in values["widths"]), values["variant"], values["dropout_p"]
        )
        recipe = Recipe(**{f.name: values.get(f.name, f.default) for f in fields(Recipe)})
        return cls(
            architecture,
            seed=values["seed"],
            label_noise=values["label_noise"],
            recipe=recipe,
            dataset=values["dataset"],
            limit=values["limit"],
            label_noise_kind=values.get("label_noise_kind", "random"),
            checkpoint_every=values.get("checkpoint_every"),
        )


@dataclass(frozen=True)
class TrainedNetwork:
    """One trained network: the job that made it and what training measured.

    ``train_accuracy`` is measured after training, in inference form, on the labels the network
    was trained on (label noise included); ``test_accuracy`` on the true test labels. The last
    three fields are known only to the run that trained it, so they live in the manifest, not in
    the ONNX file (which must be byte-identical between runs). A checkpoint (``final`` False) is
    the network after ``epochs`` epochs of a longer run (``TrainingJob.checkpoint_every``).
    """

    job: TrainingJob
    epochs: int
    best_epoch: int
    stopped_early: bool
    train_accuracy: float
    test_accuracy: float
    params: int
    train_history: tuple[float, ...] = ()
    seconds: float | None = None
    device: str | None = None
    final: bool = True

    @property
    def name(self) -> str:
        """The job's name; a checkpoint adds its epoch, e.g. ``…_s0_e20``."""
        return self.job.name if self.final else f"{self.job.name}_e{self.epochs}"

    @property
    def file(self) -> str:
        """The file name a grid gives the network."""
        return f"{self.name}.onnx"

    def results(self) -> dict[str, Any]:
        """What training measured, as JSON-ready values (the part of the metadata after the job)."""
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "params": self.params,
            "final": self.final,
        }

    def to_manifest(self) -> dict[str, Any]:
        """The network's ``manifest.jsonl`` line."""
        return {
            "name": self.name,
            **self.job.to_dict(),
            **self.results(),
            "train_history": list(self.train_history),
            "seconds": self.seconds,
            "device": self.device,
            "file": self.file,
        }

    @classmethod
    def from_manifest(cls, values: Mapping[str, Any]) -> TrainedNetwork:
        """The record of a manifest line; raises ``KeyError``/``TypeError``/``AuditError`` if it is not one."""
        return cls(
            job=TrainingJob.from_dict(values),
            **{key: values[key] for key in _RESULT_KEYS if key in values or key not in _OPTIONAL_KEYS},
            train_history=tuple(values["train_history"]),
            seconds=values["seconds"],
            device=values["device"],
        )

    def to_metadata(self, torch_version: str) -> dict[str, str]:
        """The ONNX ``metadata_props``: the job, its results and the fixed parts of the recipe, as strings.

        Only values that are the same on every run of the job go here, so re-running a job on the
        same machine reproduces the file byte for byte.
        """
        a, recipe = self.job.architecture, self.job.recipe
        fixed = {"optimizer": recipe.optimizer, "init": a.init, "activation": a.activation, "trainer": TRAINER}
        merged = {**self.job.to_dict(), **self.results(), **fixed, "torch_version": torch_version}
        return {key: _text(value) for key, value in merged.items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> TrainedNetwork:
        """The record an exported network carries; ``AuditError`` if ``props`` were not written by ``to_metadata``."""
        if props.get("trainer") != TRAINER:
            raise AuditError("not a network exported by auditor-train (no trainer=auditor-train metadata)")
        try:
            values: dict[str, Any] = {key: _value(key, props[key]) for key in _METADATA_KEYS}
            values.update({key: _value(key, props[key]) for key in _OPTIONAL_KEYS if key in props})
            results = {key: values[key] for key in _RESULT_KEYS if key in values}
            return cls(job=TrainingJob.from_dict(values), **results)
        except (KeyError, ValueError, TypeError, RecursionError) as error:
            raise AuditError(f"auditor-train metadata is incomplete or malformed ({error})") from None


_RESULT_KEYS = ("epochs", "best_epoch", "stopped_early", "train_accuracy", "test_accuracy", "params", "final")
_TEXT_KEYS = ("arch", "variant", "dataset", "label_noise_kind")  # written as they are; the rest is JSON or a list
_JOB_KEYS = ("arch", "widths", "variant", "dropout_p", "seed", "label_noise", "dataset", "limit")
# Keys added after the first networks were exported: a file without them takes the default.
_OPTIONAL_KEYS = ("label_noise_kind", "checkpoint_every", "nesterov", "final")
_METADATA_KEYS = tuple(
    key for key in (*_JOB_KEYS, *(f.name for f in fields(Recipe)), *_RESULT_KEYS) if key not in _OPTIONAL_KEYS
)


def _text(value: Any) -> str:
    """A metadata value: strings as they are, widths as ``11,4``, the rest as JSON (``null``, ``true``)."""
    if isinstance(value, str):
        return value
    return ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)


def _value(key: str, text: str) -> Any:
    """The inverse of ``_text`` for the metadata key ``key``."""
    if key in _TEXT_KEYS:
        return text
    if key == "widths":
        return [int(part) for part in text.split(",")]
    return json.loads(text)
