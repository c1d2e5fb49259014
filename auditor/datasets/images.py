"""Image folders as datasets: found, decoded with Pillow in worker threads, resized, centre-cropped
and streamed in batches of uint8 samples laid out as the model input takes them.

Layout of ``DIR``:

- ``DIR/<class>/**/*.png|jpg|jpeg|webp``: the torchvision ``ImageFolder`` convention. The class
  folders, sorted by name, give the label ids 0, 1, …; images may sit at any depth below them.
- ``DIR/*.png|…``: a flat folder, no labels.
- ``DIR/train/`` and/or ``DIR/test/``, each one of the two layouts above: the splits. Class ids
  then come from the class folders of both splits together, so a class means the same id in each.
  Without those folders ``DIR`` serves whichever single split is asked, and never "both".

Anything that mixes these (images beside class folders, ``train/`` beside other folders) is
refused in one line. Names starting with "." and files of other types are ignored. Within a
split the images are sorted by path, classes first. Links are followed only while they stay in
``DIR``; a link that leads outside it is refused, as is a cycle of folder links.

Each image becomes one sample: converted to Pillow mode ``L`` (Pillow's luma) or ``RGB`` (alpha
dropped) as the model's channel count asks; resized with Pillow's antialiased bilinear filter so
that it just covers the crop (or so that its shorter side is ``resize``, sizes rounded down);
centre-cropped (offsets rounded down); and laid out as CHW, HWC or HW. An image that already
has the target size is not resampled, so lossless files give back their exact pixels. Pixels stay
uint8, so CNA's α keeps its 0–255 range (SPEC §4). EXIF orientation is not applied, as in
torchvision; animated files give their first frame.

A file that is not a readable 8-bit PNG, JPEG or WebP, is larger than ``MAX_FILE_BYTES``, or
has more than ``MAX_PIXELS`` pixels before or after resizing (decompression bombs) is a bad
image: a one-line ``DataError`` naming it relative to ``DIR``, or with ``skip_bad`` a skipped
file, listed by ``Dataset.skipped``. ``--limit`` counts files, so skipped files make a split
shorter than its ``count``.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from auditor.datasets.batches import Batch, Dataset
from auditor.errors import DataError, first_line
from auditor.records import MAX_PIXELS, SPLITS, ImageOptions
from auditor.sinks import shape_text

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
MAX_FILE_BYTES = 1 << 28  # 256 MiB
WORKERS = min(4, os.cpu_count() or 1)  # decoding threads; at most this many full-size images at once

_FORMATS = ("PNG", "JPEG", "WEBP")  # the only Pillow plugins that may read a file, whatever its name
_MODES_8BIT = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_OPEN_LOCK = threading.Lock()
_LAYOUTS = {"chw": "N×C×H×W", "hwc": "N×H×W×C", "hw": "N×H×W"}


@dataclass(frozen=True)
class _Target:
    """What every sample becomes: channels (1 or 3), layout, and the (height, width) crop or None."""

    channels: int
    layout: str
    crop: tuple[int, int] | None
    resize: int | None

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def sample_shape(self, height: int, width: int) -> tuple[int, ...]:
        if self.layout == "chw":
            return (self.channels, height, width)
        return (height, width) if self.layout == "hw" else (height, width, self.channels)


class _BadImage(Exception):
    """A file that cannot become a sample; the message says why, after the file's name."""


def open_folder(spec: str, splits: tuple[str, ...], limit: int | None, options: ImageOptions) -> list[Dataset]:
    """The wanted splits of the image folder ``spec``, listed and checked but not yet decoded.

    When the model input leaves the sample size open, the first good image is decoded here to
    fix it. Every later sample must then have the same size.
    """
    root = Path(spec).expanduser().resolve()
    target = _target(options)
    folders = _split_folders(root, spec, splits)
    classes = _classes(root, spec, folders)
    datasets = []
    for split, prefix in folders.items():
        if split not in splits:
            continue
        names, labels = _listing(root, spec, prefix, classes)
        if limit is not None:
            names, labels = names[:limit], None if labels is None else labels[:limit]
        if not names:
            raise DataError(f"limit 0 leaves no samples of {root.name} {split}; use a limit >= 1, or none")
        skipped: set[str] = set()
        shape = _fixed_shape(target) or _first_shape(root, names, target, options.skip_bad, skipped)
        datasets.append(
            Dataset(
                name=root.name,
                split=split,
                count=len(names),
                sample_shape=shape,
                dtype=np.dtype(np.uint8),
                has_labels=labels is not None,
                _read=partial(_batches, root, names, labels, target, shape, options.skip_bad, skipped),
                _skipped=partial(_sorted, skipped),
            )
        )
    return datasets


# --- From the model input to a target -----------------------------------------------------------


def _target(options: ImageOptions) -> _Target:
    """Channels, layout and crop from the model input's shape, checked against ``--crop``."""
    shape = options.input_shape
    if shape is None:
        channels, layout, size = 3, "hwc", (None, None)
    else:
        channels, layout, size = _read_input_shape(tuple(shape))
    crop = (options.crop, options.crop) if options.crop is not None else None
    model_size = size if None not in size else None
    if crop is not None and model_size is not None and crop != model_size:
        raise DataError(
            f"--crop {options.crop} makes {options.crop}×{options.crop} images but the model input takes "
            f"{model_size[0]}×{model_size[1]}; leave --crop out or match the model"
        )
    crop = crop or model_size  # type: ignore[assignment]
    if crop is not None and options.resize is not None and options.resize < min(crop):
        raise DataError(
            f"--resize {options.resize} is smaller than the {crop[0]}×{crop[1]} crop; make it at least {max(crop)}"
        )
    return _Target(channels, layout, crop, options.resize)


def _read_input_shape(shape: tuple[int | str | None, ...]) -> tuple[int, str, tuple[int | None, int | None]]:
    """(channels, layout, (height, width) with None where symbolic) of a model input shape."""

    def known(d: object) -> int | None:
        return d if isinstance(d, int) and d > 0 else None

    dims = [known(d) for d in shape[1:]]
    if len(dims) == 3 and dims[0] in (1, 3):
        return dims[0], "chw", (dims[1], dims[2])  # type: ignore[return-value]
    if len(dims) == 3 and dims[2] in (1, 3):
        return dims[2], "hwc", (dims[0], dims[1])  # type: ignore[return-value]
    if len(dims) == 2:
        return 1, "hw", (dims[0], dims[1])
    if len(dims) == 1 and dims[0] is not None and math.isqrt(dims[0]) ** 2 == dims[0]:
        side = math.isqrt(dims[0])  # a flat input of side² values: one-channel side×side images
        return 1, "hw", (side, side)
    shown = shape_text(shape)
    raise DataError(
        f"image folders feed models whose input is {', '.join(_LAYOUTS.values())} with C = 1 or 3, or a "
        f"flat square; this model's input is {shown}; give the data as a .npz/.npy file instead"
    )


def _fixed_shape(target: _Target) -> tuple[int, ...] | None:
    return None if target.crop is None else target.sample_shape(*target.crop)


# --- Finding the images --------------------------------------------------------------------------


def _split_folders(root: Path, spec: str, splits: tuple[str, ...]) -> dict[str, str]:
    """The folder of each split present, relative to ``root`` ("" for ``root`` itself)."""
    files, folders = _entries(root, spec, "")
    present = [split for split in SPLITS if split in folders]
    if not present:
        if len(splits) > 1:
            raise DataError(
                f"{spec} holds a single split (it has no train/ or test/ folder), so it cannot serve both; "
                "use --split train or --split test, or put the images in train/ and test/"
            )
        return {splits[0]: ""}
    others = sorted(set(folders) - set(SPLITS)) + files
    if others:
        raise DataError(
            f"{spec} has {' and '.join(f'{s}/' for s in present)} beside other entries ({_few(others)}); "
            "keep only train/ and test/ at its top level, or no split folders at all"
        )
    for split in splits:
        if split not in present:
            raise DataError(f"{spec} has no {split}/ folder; add one, or choose --split {' or '.join(present)}")
    return {split: split for split in present}


def _classes(root: Path, spec: str, folders: dict[str, str]) -> list[str]:
    """The class names of every split folder together, sorted: their index is the label."""
    names: set[str] = set()
    for prefix in folders.values():
        names.update(_entries(root, spec, prefix)[1])
    return sorted(names)


def _listing(root: Path, spec: str, prefix: str, classes: list[str]) -> tuple[list[str], np.ndarray | None]:
    """The images of one split folder, sorted, with their labels (None for a flat folder)."""
    where = f"{spec}/{prefix}" if prefix else spec
    files, folders = _entries(root, spec, prefix)
    if files and folders:
        raise DataError(
            f"{where} has images ({_few(files)}) beside class folders ({_few(sorted(folders))}); put every image "
            "in a class folder, or use a flat folder of images"
        )
    if files:
        return files, None
    names: list[str] = []
    labels: list[int] = []
    for name in sorted(folders):
        found = _walk(root, spec, folders[name], {(root / prefix).resolve()})
        names += found
        labels += [classes.index(name)] * len(found)
    if not names:
        raise DataError(f"{where} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images; add some")
    return names, np.array(labels, np.int64)


def _walk(root: Path, spec: str, prefix: str, ancestors: set[Path]) -> list[str]:
    """Every image below the folder ``prefix``, at any depth, sorted by path."""
    here = (root / prefix).resolve()
    if here in ancestors:
        raise DataError(f"{spec}/{prefix} is a link to a folder that contains it; remove the link cycle")
    files, folders = _entries(root, spec, prefix)
    for sub in folders.values():
        files += _walk(root, spec, sub, ancestors | {here})
    return sorted(files)


def _entries(root: Path, spec: str, prefix: str) -> tuple[list[str], dict[str, str]]:
    """The image files (sorted relative names) and subfolders (name → relative name) of one folder.

    Hidden names and other files are left out. A link is followed only when its target stays
    in ``root``. An image name that is not a regular file stays in, to be refused when read.
    """
    folder = root / prefix
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {spec}/{prefix}: {exc.strerror or exc}; check the folder") from None
    files, folders = [], {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relative = f"{prefix}/{entry.name}" if prefix else entry.name
        if entry.is_symlink() and not Path(os.path.realpath(entry.path)).is_relative_to(root):
            raise DataError(
                f"{relative!r} is a link that leads outside the data folder; links are followed only within "
                "it: copy the target in, or give the folder that holds it"
            )
        if entry.is_dir():
            folders[entry.name] = relative
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            files.append(relative)
    return files, folders


def _few(names: Sequence[str], shown: int = 3) -> str:
    more = f", … ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(repr(n) for n in names[:shown]) + more


def _sorted(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(names))


# --- Decoding ------------------------------------------------------------------------------------


def _scaled_size(width: int, height: int, target: _Target) -> tuple[int, int]:
    """(width, height) after resizing: shorter side to ``resize``, else just covering the crop."""
    if target.resize is not None:
        n = target.resize
        return (n, height * n // width) if width <= height else (width * n // height, n)
    if target.crop is None:
        return width, height
    crop_h, crop_w = target.crop
    if crop_w * height >= crop_h * width:  # the width needs the larger scale
        return crop_w, max(crop_h, height * crop_w // width)
    return max(crop_w, width * crop_h // height), crop_h


def _decode(root: Path, name: str, target: _Target) -> np.ndarray:
    """The image ``name`` as a uint8 sample in the target layout; ``_BadImage`` for a bad file."""
    path = root / name
    try:  # non-blocking, so that a FIFO cannot stall the open; it is refused just below
        stream = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as exc:
        raise _BadImage(f"cannot be read ({exc.strerror or exc})") from None
    with stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _BadImage("is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise _BadImage(f"is {info.st_size} bytes, over the {MAX_FILE_BYTES}-byte limit")
        try:
            with _open_image(stream) as opened:
                _check_pixels(opened.size, "")
                if opened.mode not in _MODES_8BIT:
                    raise _BadImage(f"has pixel mode {opened.mode}; save it with 8 bits per channel")
                # A palette with transparency goes through RGBA, as Pillow advises (else it warns on stderr).
                palette_alpha = opened.mode == "P" and "transparency" in opened.info
                image = (opened.convert("RGBA") if palette_alpha else opened).convert(target.mode)  # decodes
        except _BadImage:
            raise
        except UnidentifiedImageError:
            raise _BadImage("is not a PNG, JPEG or WebP image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _BadImage(f"has more than {MAX_PIXELS} pixels (a decompression bomb?)") from None
        except Exception as exc:  # Pillow's decoders raise many types on malformed files
            detail = exc.strerror if isinstance(exc, OSError) and exc.filename else first_line(exc)
            raise _BadImage(f"cannot be decoded ({type(exc).__name__}: {detail})".replace(str(path), name)) from None
    size = _scaled_size(image.width, image.height, target)
    if size != image.size:
        _check_pixels(size, " after resizing")
        image = image.resize(size, Image.Resampling.BILINEAR)
    if target.crop is not None and (target.crop[1], target.crop[0]) != image.size:
        image = _centre_crop(image, target.crop, name, target.resize)
    pixels = np.asarray(image, dtype=np.uint8)
    if target.layout == "hw":
        return pixels
    if target.channels == 1:
        return pixels[None] if target.layout == "chw" else pixels[..., None]
    return pixels.transpose(2, 0, 1) if target.layout == "chw" else pixels


def _open_image(stream: BinaryIO) -> Image.Image:
    """Pillow's lazy open (header only), limited to our formats, its bomb warning raised as an error.

    Between Pillow's warning threshold and twice it, Pillow only warns; ``MAX_PIXELS`` lies below
    the threshold, so the file is refused anyway, and the warning must not reach stderr. The
    filter is process-wide, hence the lock; only header parsing runs under it, and the filter
    touches no other warning.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(stream, formats=_FORMATS)


def _centre_crop(image: Image.Image, crop: tuple[int, int], name: str, resize: int | None) -> Image.Image:
    """The centre ``crop`` (height, width) of ``image``, offsets rounded down."""
    crop_h, crop_w = crop
    if image.width < crop_w or image.height < crop_h:  # only an explicit --resize can leave it smaller
        raise DataError(
            f"image {name!r} is {image.width}×{image.height} after --resize {resize}, smaller than the "
            f"{crop_w}×{crop_h} crop; raise --resize"
        )
    left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def _check_pixels(size: tuple[int, int], when: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise _BadImage(f"is {width}×{height} pixels{when}, over the {MAX_PIXELS}-pixel limit (a decompression bomb?)")


def _refusal(name: str, reason: str) -> DataError:
    return DataError(f"image {name!r} {reason}; fix or remove it, or pass --skip-bad to skip bad images")


def _first_shape(root: Path, names: list[str], target: _Target, skip_bad: bool, skipped: set[str]) -> tuple[int, ...]:
    """The shape of the first good image, which every later one must share."""
    for name in names:
        try:
            return _decode(root, name, target).shape
        except _BadImage as exc:
            if not skip_bad:
                raise _refusal(name, str(exc)) from None
            skipped.add(name)
    raise DataError(f"none of the {len(names)} images can be read; check the files")


# --- Streaming -----------------------------------------------------------------------------------


def _batches(
    root: Path,
    names: list[str],
    labels: np.ndarray | None,
    target: _Target,
    shape: tuple[int, ...],
    skip_bad: bool,
    skipped: set[str],
    batch_size: int,
) -> Iterator[Batch]:
    """The good images in order, ``batch_size`` at a time, decoded by ``WORKERS`` threads.

    At most ``batch_size + 2·WORKERS`` images are decoded ahead of the batch being filled, so
    memory is bounded by about two batches whatever the folder's size. Bad images are refused,
    or with ``skip_bad`` added to ``skipped``.
    """
    ahead = batch_size + 2 * WORKERS
    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    queued = 0
    out, kept = np.empty((batch_size, *shape), np.uint8), []
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="auditor-images") as pool:
        try:
            while pending or queued < len(names):
                while queued < len(names) and len(pending) < ahead:
                    pending.append((queued, pool.submit(_decode, root, names[queued], target)))
                    queued += 1
                index, future = pending.popleft()
                try:
                    sample = future.result()
                except _BadImage as exc:
                    if not skip_bad:
                        raise _refusal(names[index], str(exc)) from None
                    skipped.add(names[index])
                    continue
                if sample.shape != shape:
                    raise DataError(
                        f"image {names[index]!r} gives samples of shape {sample.shape}, the earlier ones {shape}; "
                        "give --crop N (and --resize N) or images of one size"
                    )
                out[len(kept)] = sample
                kept.append(index)
                if len(kept) == batch_size:
                    yield Batch(out, None if labels is None else labels[kept])
                    out, kept = np.empty_like(out), []
            if kept:
                yield Batch(out[: len(kept)], None if labels is None else labels[kept])
        finally:
            for _, future in pending:
                future.cancel()
