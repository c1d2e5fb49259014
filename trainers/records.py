"""The typed records that cross the trainer's modules: what to train, and what training gave.

``Architecture``, ``Recipe`` and ``Job`` say what a network is and how it is trained (SPEC §7);
``TrainedNetwork`` adds what training measured. Each record has one flat form, spelled only
here: a manifest line (JSON values) and the ONNX ``metadata_props`` (strings), so a grid's
manifest and a folder of exported networks read back as the same records. PyTorch is not
imported: the grid report reads these records without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from auditor.errors import AuditError, require

ARCHS = {"lenet-300-100": 2, "lenet-5": 3}  # architecture -> number of hidden widths
# Where BatchNorm or Dropout sits in each hidden block (SPEC §7): "batchnorm" and "dropout" follow
# the activation, as Keras Dense(n, activation="elu") then BatchNormalization() would;
# "batchnorm-pre" normalises between the linear op and the activation (Dense → BatchNorm → ELU).
VARIANTS = ("none", "batchnorm", "batchnorm-pre", "dropout")
CLASSES = 10
# Facts about the recipe that no option changes, written into every exported network.
FIXED_METADATA = {
    "optimizer": "sgd-nesterov",
    "init": "glorot-uniform",
    "activation": "elu",
    "trainer": "auditor-train",
}


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
                (all(w >= 1 for w in self.widths), f"widths must be positive integers, got {self.widths_text}"),
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
        The tests check this against the PyTorch module that ``trainers.lenet.build`` makes.
        """
        if self.arch == "lenet-300-100":
            n1, n2 = self.widths
            count = (28 * 28 + 1) * n1 + (n1 + 1) * n2 + (n2 + 1) * CLASSES
        else:
            n1, n2, n3 = self.widths
            count = (25 + 1) * n1 + (25 * n1 + 1) * n2 + (n2 * 16 + 1) * n3 + (n3 + 1) * CLASSES
        return count + (2 * sum(self.widths) if self.variant.startswith("batchnorm") else 0)


@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters of SPEC §7; every one can be overridden from the CLI."""

    lr: float = 0.001
    momentum: float = 0.9
    l2: float = 0.0005
    batch_size: int = 32
    patience: int = 5
    max_epochs: int | None = None
    restore_best: bool = False

    def __post_init__(self) -> None:
        require(
            [
                (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
                (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
                (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
                (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
                (
                    self.max_epochs is None or self.max_epochs >= 1,
                    f"max epochs must be >= 1, got {self.max_epochs}",
                ),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """Everything that determines one trained network; equal jobs give equal weights on one machine."""

    architecture: Architecture
    seed: int = 0
    label_noise: float = 0.0
    recipe: Recipe = field(default_factory=Recipe)
    dataset: str = "mnist"
    limit: int | None = None

    def __post_init__(self) -> None:
        require(
            [
                (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
                (0 <= self.label_noise <= 1, f"label-noise fraction must be in [0, 1], got {self.label_noise}"),
                (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            ]
        )

    @property
    def name(self) -> str:
        """A predictable file stem, e.g. ``lenet-300-100_w11-4_none_n0_s0``."""
        a = self.architecture
        widths = "-".join(str(w) for w in a.widths)
        return f"{a.arch}_w{widths}_{a.variant}_n{self.label_noise:g}_s{self.seed}"

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
            **self.recipe.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Job:
        """The job of a ``to_dict`` result (extra keys are ignored; a missing one raises ``KeyError``)."""
        architecture = Architecture(
            values["arch"], tuple(int(w) for w in values["widths"]), values["variant"], values["dropout_p"]
        )
        recipe = Recipe(**{f.name: values[f.name] for f in fields(Recipe)})
        return cls(
            architecture,
            seed=values["seed"],
            label_noise=values["label_noise"],
            recipe=recipe,
            dataset=values["dataset"],
            limit=values["limit"],
        )


@dataclass(frozen=True)
class TrainedNetwork:
    """One trained network: the job that made it and what training measured.

    ``train_accuracy`` is measured after training, in inference form, on the labels the network
    was trained on (label noise included); ``test_accuracy`` on the true test labels. The last
    three fields are known only to the run that trained it, so they live in the manifest, not in
    the ONNX file (which must be byte-identical between runs).
    """

    job: Job
    epochs: int
    best_epoch: int
    stopped_early: bool
    train_accuracy: float
    test_accuracy: float
    params: int
    train_history: tuple[float, ...] = ()
    seconds: float | None = None
    device: str | None = None

    @property
    def name(self) -> str:
        return self.job.name

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
            job=Job.from_dict(values),
            **{key: values[key] for key in _RESULT_KEYS},
            train_history=tuple(values["train_history"]),
            seconds=values["seconds"],
            device=values["device"],
        )

    def to_metadata(self, torch_version: str) -> dict[str, str]:
        """The ONNX ``metadata_props``: the job, its results and the fixed parts of the recipe, as strings.

        Only values that are the same on every run of the job go here, so re-running a job on the
        same machine reproduces the file byte for byte.
        """
        merged = {**self.job.to_dict(), **self.results(), **FIXED_METADATA, "torch_version": torch_version}
        return {key: _text(value) for key, value in merged.items()}

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> TrainedNetwork:
        """The record an exported network carries; ``AuditError`` if ``props`` were not written by ``to_metadata``."""
        if props.get("trainer") != FIXED_METADATA["trainer"]:
            raise AuditError("not a network exported by auditor-train (no trainer=auditor-train metadata)")
        try:
            values: dict[str, Any] = {key: _value(key, props[key]) for key in _METADATA_KEYS}
            return cls(job=Job.from_dict(values), **{key: values[key] for key in _RESULT_KEYS})
        except (KeyError, ValueError, TypeError, RecursionError) as error:
            raise AuditError(f"auditor-train metadata is incomplete or malformed ({error})") from None


_RESULT_KEYS = ("epochs", "best_epoch", "stopped_early", "train_accuracy", "test_accuracy", "params")
_TEXT_KEYS = ("arch", "variant", "dataset")  # written as they are; everything else is JSON or a list
_JOB_KEYS = ("arch", "widths", "variant", "dropout_p", "seed", "label_noise", "dataset", "limit")
_METADATA_KEYS = (*_JOB_KEYS, *(f.name for f in fields(Recipe)), *_RESULT_KEYS)


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
