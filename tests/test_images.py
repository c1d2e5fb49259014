"""auditor.datasets.images on folders the tests write themselves: PNG, JPEG and WebP made from real MNIST,
RGB images resized and cropped by hand with Pillow, and real audits of both."""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Dataset, skipped_warnings
from auditor.datasets.splits import load_arrays, open_dataset, open_splits
from auditor.errors import AuditError, DataError
from auditor.records import ImageOptions
from tests.models import Net

REPO = Path(__file__).resolve().parents[1]
LENET5 = REPO / "examples" / "lenet5_3_9_4.onnx"  # input ("batch", 1, 28, 28)


def refused(call: Callable[[], object], *fragments: str, kind: type[AuditError] = DataError) -> str:
    """Run ``call``, expect a one-line refusal of ``kind`` containing every fragment."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def read_all(dataset: Dataset, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    batches = list(dataset.batches(batch_size))
    x = np.concatenate([b.x for b in batches])
    y = None if batches[0].y is None else np.concatenate([b.y for b in batches])
    return x, y


def save(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def class_folder(root: Path, x: np.ndarray, y: np.ndarray, suffix: str = ".png", **kwargs: object) -> np.ndarray:
    """``root/<digit>/<index>.png`` for each image; returns the order the folder lists them in.

    The labels the folder gives are the ranks of the digits present (``ids``), which equal the
    digits only when all ten are there.
    """
    for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
        save(root / str(label) / f"{i:04d}{suffix}", pixels, **kwargs)
    return np.argsort(y, kind="stable")


def ids(y: np.ndarray) -> np.ndarray:
    """The label ids of class folders named by the digits in ``y``: their rank among those present."""
    return np.unique(y, return_inverse=True)[1]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_arrays("mnist", "test", limit=1000)
    assert y is not None
    return x, y


def rgb_images(seed: int, *sizes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]


# --- The same audit as the arrays -------------------------------------------------------------


def test_a_folder_of_1000_pngs_audits_like_the_same_npy(tmp_path: Path, digits) -> None:
    x, _ = digits
    for i, pixels in enumerate(x):
        save(tmp_path / "digits" / f"{i:04d}.png", pixels)
    np.save(tmp_path / "digits.npy", x)
    prepared = prepare(LENET5, device="cpu")
    config = AuditConfig(batch_size=100)
    folder = open_splits(str(tmp_path / "digits"), "test", images=ImageOptions(prepared.structure.input.shape))
    assert folder[0].count == 1000 and folder[0].sample_shape == (1, 28, 28) and not folder[0].has_labels
    from_folder = audit(prepared, folder, config).to_dict()
    from_npy = audit(prepared, open_splits(str(tmp_path / "digits.npy"), "test"), config).to_dict()
    assert from_folder["splits"] == from_npy["splits"]
    assert from_folder["splits"]["test"]["samples"] == 1000
    assert from_folder["warnings"] == from_npy["warnings"]


def test_train_and_test_class_folders_audit_like_the_same_npz(tmp_path: Path, digits) -> None:
    x, y = digits
    train, test = slice(0, 600), slice(600, 1000)
    order_train = class_folder(tmp_path / "d" / "train", x[train], y[train])
    order_test = class_folder(tmp_path / "d" / "test", x[test], y[test])
    np.savez(
        tmp_path / "d.npz",
        x_train=x[train][order_train],
        y_train=y[train][order_train],
        x_test=x[test][order_test],
        y_test=y[test][order_test],
    )
    prepared = prepare(LENET5, device="cpu")
    config = AuditConfig(batch_size=128)
    images = ImageOptions(prepared.structure.input.shape)
    from_folder = audit(prepared, open_splits(str(tmp_path / "d"), "both", images=images), config).to_dict()
    from_npz = audit(prepared, open_splits(str(tmp_path / "d.npz"), "both"), config).to_dict()
    assert from_folder["splits"] == from_npz["splits"]
    assert from_folder["cna_margin"] == from_npz["cna_margin"] is not None
    assert from_folder["splits"]["test"]["accuracy"] is not None


def test_nhwc_and_nchw_models_audit_an_rgb_folder_alike(tmp_path: Path) -> None:
    for i, pixels in enumerate(rgb_images(3, *[(20, 14)] * 12)):
        save(tmp_path / "rgb" / ("ab"[i % 2]) / f"{i:02d}.png", pixels)

    def model(channels_last: bool):  # the same weights; only the input layout differs
        net = Net(("batch", 12, 12, 3) if channels_last else ("batch", 3, 12, 12), seed=5)
        x = net.op("Transpose", net.input, perm=[0, 3, 1, 2]) if channels_last else net.input
        x = net.op("Relu", net.conv(x, 3, 4, out="conv"))
        x = net.op("Flatten", x)
        return prepare(net.build(net.dense(x, 4 * 12 * 12, 2, out="logits")).SerializeToString(), device="cpu")

    reports = []
    for channels_last in (False, True):
        prepared = model(channels_last)
        datasets = open_splits(str(tmp_path / "rgb"), "test", images=ImageOptions(prepared.structure.input.shape))
        assert datasets[0].sample_shape == ((12, 12, 3) if channels_last else (3, 12, 12))
        reports.append(audit(prepared, datasets, AuditConfig(batch_size=5)).to_dict()["splits"])
    assert reports[0] == reports[1]
    assert reports[0]["test"]["samples"] == 12


# --- Layouts, labels and order ----------------------------------------------------------------


def test_class_folders_sorted_give_labels_and_nested_images_count(tmp_path: Path) -> None:
    gray = np.zeros((4, 4), np.uint8)
    for name in ("dog/a.png", "ant/z.png", "ant/deep/er/b.png", "cat/c.PNG", "cat/notes.txt", ".hidden/x.png"):
        if name.endswith(".txt"):
            (tmp_path / "pets" / name).write_text("not an image")
        else:
            save(tmp_path / "pets" / name, gray + len(name))
    dataset = open_dataset(str(tmp_path / "pets"), "train", images=ImageOptions(("n", 1, 4, 4)))
    assert dataset.count == 4 and dataset.has_labels and dataset.name == "pets"
    x, y = read_all(dataset, 3)
    assert y.tolist() == [0, 0, 1, 2]  # ant, ant, cat, dog; deep/er/b.png sorts before z.png
    assert x[:, 0, 0, 0].tolist() == [17, 9, 9, 9]


def test_class_ids_come_from_both_split_folders(tmp_path: Path) -> None:
    gray = np.zeros((3, 3), np.uint8)
    for name in ("train/a/1.png", "train/b/1.png", "train/c/1.png", "test/a/1.png", "test/c/1.png"):
        save(tmp_path / "d" / name, gray)
    (tmp_path / "d" / "README.md").write_text("other files at the top are fine")
    test = open_dataset(str(tmp_path / "d"), "test", images=ImageOptions((1, 3, 3)))
    assert read_all(test)[1].tolist() == [0, 2]
    train, test = open_splits(str(tmp_path / "d"), "both")
    assert (train.split, train.count, test.split, test.count) == ("train", 3, "test", 2)


def test_a_flat_folder_is_unlabelled_and_sorted_by_name(tmp_path: Path, digits) -> None:
    x, _ = digits
    for i in (3, 1, 2):
        save(tmp_path / "flat" / f"img{i}.png", x[i])
    dataset = open_dataset(str(tmp_path / "flat"), "train", images=ImageOptions(("n", 28, 28)))
    got, labels = read_all(dataset, 2)
    assert labels is None and not dataset.has_labels
    assert np.array_equal(got, x[[1, 2, 3]])


def test_limit_counts_files_and_a_flat_784_input_takes_square_images(tmp_path: Path, digits) -> None:
    x, y = digits
    order = class_folder(tmp_path / "d", x[:50], y[:50])
    dataset = open_dataset(str(tmp_path / "d"), "test", limit=7, images=ImageOptions(("n", 784)))
    assert dataset.count == 7 and dataset.sample_shape == (28, 28)
    got, labels = read_all(dataset, 3)
    assert np.array_equal(got, x[:50][order][:7]) and np.array_equal(labels, ids(y[:50])[order][:7])


def test_jpeg_and_webp_folders(tmp_path: Path, digits) -> None:
    x, y = digits
    order = class_folder(tmp_path / "jpeg", x[:40], y[:40], ".jpg", quality=95)
    got, labels = read_all(open_dataset(str(tmp_path / "jpeg"), "test", images=ImageOptions(("n", 1, 28, 28))))
    assert np.array_equal(labels, ids(y[:40])[order])
    error = np.abs(got[:, 0].astype(int) - x[:40][order].astype(int))
    assert error.mean() < 3 and got.dtype == np.uint8  # JPEG is lossy, but close

    order = class_folder(tmp_path / "webp", x[:10], y[:10], ".webp", lossless=True)
    got, _ = read_all(open_dataset(str(tmp_path / "webp"), "test", images=ImageOptions(("n", 28, 28, 1))))
    assert np.array_equal(got[..., 0], x[:10][order])  # lossless WebP: exact


# --- Resizing and cropping, checked against Pillow by hand ------------------------------------


def test_rgb_resize_and_crop_match_pillow_by_hand(tmp_path: Path) -> None:
    wide, tall = rgb_images(7, (40, 30), (30, 50))
    save(tmp_path / "rgb" / "a.png", wide)
    save(tmp_path / "rgb" / "b.png", tall)

    def pillow(pixels: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR).crop(box))

    def folder(**options: object) -> np.ndarray:
        return read_all(open_dataset(str(tmp_path / "rgb"), "test", images=ImageOptions(**options)))[0]

    # Default for a 16×16 model: the shorter side to 16, rounded down: 40×30 → 21×16, 30×50 → 16×26;
    # then the centre 16×16, offsets rounded down: (21-16)//2 = 2 across, (26-16)//2 = 5 down.
    chw = folder(input_shape=("n", 3, 16, 16))
    assert np.array_equal(chw[0].transpose(1, 2, 0), pillow(wide, (21, 16), (2, 0, 18, 16)))
    assert np.array_equal(chw[1].transpose(1, 2, 0), pillow(tall, (16, 26), (0, 5, 16, 21)))
    assert np.array_equal(folder(input_shape=("n", 16, 16, 3)), chw.transpose(0, 2, 3, 1))

    # --resize 20: 40×30 → 26×20 (40·20//30), 30×50 → 20×33; the centre 16×16 at (5, 2) and (2, 8).
    resized = folder(input_shape=("n", 16, 16, 3), resize=20)
    assert np.array_equal(resized[0], pillow(wide, (26, 20), (5, 2, 21, 18)))
    assert np.array_equal(resized[1], pillow(tall, (20, 33), (2, 8, 18, 24)))

    # A model of any size: --crop 12 alone resizes to just cover 12×12: 16×12 and 12×20.
    cropped = folder(input_shape=("n", 3, "h", "w"), crop=12)
    assert np.array_equal(cropped[1].transpose(1, 2, 0), pillow(tall, (12, 20), (0, 4, 12, 16)))

    # One channel: Pillow's luma, then the same geometry; a non-square model covers the crop.
    gray = folder(input_shape=("n", 1, 10, 16))  # 40×30 → 16×12 (width binds), crop rows 1..11
    luma = np.asarray(Image.fromarray(wide).convert("L").resize((16, 12), Image.Resampling.BILINEAR))
    assert gray.shape == (2, 1, 10, 16) and np.array_equal(gray[0, 0], luma[1:11])


def test_images_of_the_target_size_are_not_resampled(tmp_path: Path) -> None:
    (pixels,) = rgb_images(1, (16, 16))
    save(tmp_path / "same" / "a.png", pixels)
    got = read_all(open_dataset(str(tmp_path / "same"), "test", images=ImageOptions(("n", 16, 16, 3))))[0]
    assert np.array_equal(got[0], pixels)


def test_without_a_size_every_image_must_match_the_first(tmp_path: Path) -> None:
    a, b = rgb_images(2, (8, 8), (9, 8))
    save(tmp_path / "mixed" / "a.png", a)
    save(tmp_path / "mixed" / "b.png", b)
    dataset = open_dataset(str(tmp_path / "mixed"), "test")  # no model: as they are, RGB, H×W×C
    assert dataset.sample_shape == (8, 8, 3)
    refused(lambda: read_all(dataset), "'b.png'", "--crop")
    assert read_all(open_dataset(str(tmp_path / "mixed"), "test", images=ImageOptions(crop=8)))[0].shape == (
        2,
        8,
        8,
        3,
    )


# --- Bad images, with and without --skip-bad --------------------------------------------------


@pytest.fixture()
def with_bad_files(tmp_path: Path, digits) -> tuple[Path, np.ndarray, np.ndarray]:
    """Twelve good digits in class folders, and bad files of every kind among them."""
    x, y = digits
    root = tmp_path / "d"
    order = class_folder(root, x[:12], y[:12])
    good = save(root / "9" / "good.png", x[0]).read_bytes()
    (root / "1" / "0000-truncated.png").write_bytes(good[: len(good) // 2])
    (root / "2" / "0000-text.jpg").write_text("not an image")
    (root / "4" / "0000-pdf.webp").write_bytes(b"%PDF-1.4\n" + bytes(100))
    save(root / "5" / "0000-16bit.png", np.full((4, 4), 4000, np.uint16))
    Image.new("1", (9000, 9000)).save(root / "7" / "0000-bomb.png")  # 81M pixels in a tiny file
    Image.new("1", (10000, 10000)).save(root / "7" / "0003-bomb.png")  # over Pillow's warning threshold too
    os.mkfifo(root / "7" / "0001-fifo.png")
    (root / "7" / "0002-dangling.png").symlink_to("nowhere.png")
    expected_x = np.concatenate([x[:12][order][y[:12][order] != 9], x[:12][order][y[:12][order] == 9], x[:1]])
    expected_y = np.concatenate([np.sort(ids(y[:12])), [ids(y[:12]).max()]])  # good.png is in 9/
    return root, expected_x, expected_y


def test_a_bad_image_is_a_one_line_refusal_naming_it_inside_the_folder(with_bad_files, tmp_path: Path) -> None:
    root = with_bad_files[0]
    dataset = open_dataset(str(root), "test", images=ImageOptions(("n", 1, 28, 28)))
    message = refused(lambda: read_all(dataset), "'1/0000-truncated.png'", "--skip-bad")
    assert str(tmp_path) not in message
    for name, reason in [
        ("2/0000-text.jpg", "not a PNG, JPEG or WebP image"),
        ("4/0000-pdf.webp", "not a PNG, JPEG or WebP image"),
        ("5/0000-16bit.png", "8 bits per channel"),
        ("7/0000-bomb.png", "9000×9000 pixels"),
        ("7/0001-fifo.png", "not a regular file"),
        ("7/0002-dangling.png", "cannot be read"),
        ("7/0003-bomb.png", "more than 67108864 pixels"),
    ]:
        bad = tmp_path / "one"
        (bad / "0").mkdir(parents=True)
        os.rename(root / name, bad / "0" / "x.png")
        one = open_dataset(str(bad), "test", images=ImageOptions(("n", 28, 28)))
        message = refused(lambda one=one: read_all(one), "image '0/x.png'", reason)
        assert str(tmp_path) not in message
        (bad / "0" / "x.png").unlink()
        os.rmdir(bad / "0")
        os.rmdir(bad)


def test_skip_bad_skips_and_counts_them_and_keeps_labels_aligned(with_bad_files) -> None:
    root, expected_x, expected_y = with_bad_files
    dataset = open_dataset(str(root), "test", images=ImageOptions(("n", 1, 28, 28), skip_bad=True))
    assert dataset.count == 21  # files listed; eight of them are bad
    for _ in range(2):  # reading again never counts a file twice
        x, y = read_all(dataset, 5)
        assert np.array_equal(x[:, 0], expected_x) and np.array_equal(y, expected_y)
        assert len(dataset.skipped) == 8 and dataset.skipped[0] == "1/0000-truncated.png"
    (warning,) = skipped_warnings([dataset])
    assert warning.startswith("test: --skip-bad skipped 8 bad images of d: '1/0000-truncated.png'")


def test_skip_bad_on_a_folder_of_only_bad_images(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(zlib.compress(b"junk"))
    refused(lambda: open_dataset(str(tmp_path / "bad"), "test", images=ImageOptions(skip_bad=True)), "none of the 1")


def test_a_bad_file_deep_in_the_folder_surfaces_only_when_reached(tmp_path: Path, digits) -> None:
    x, _ = digits
    for i in range(300):
        save(tmp_path / "d" / f"{i:03d}.png", x[i])
    (tmp_path / "d" / "299.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    batches = open_dataset(str(tmp_path / "d"), "test", images=ImageOptions((1, 28, 28))).batches(10)
    assert np.array_equal(next(batches).x, x[:10])  # streamed: the end of the folder is not read yet
    refused(lambda: list(batches), "'299.png'")


# --- Folders that are refused -----------------------------------------------------------------


def test_empty_and_imageless_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(lambda: open_dataset(str(tmp_path / "empty"), "test"), "holds no png/jpg/jpeg/webp images")
    (tmp_path / "docs" / "a").mkdir(parents=True)
    (tmp_path / "docs" / "a" / "readme.txt").write_text("x")
    refused(lambda: open_dataset(str(tmp_path / "docs"), "test"), "holds no")
    save(tmp_path / "one" / "a.png", np.zeros((2, 2), np.uint8))
    refused(lambda: open_dataset(str(tmp_path / "one"), "test", limit=0), "limit 0")


def test_ambiguous_layouts_are_refused(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2), np.uint8)
    save(tmp_path / "mixed" / "a.png", pixels)
    save(tmp_path / "mixed" / "cat" / "b.png", pixels)
    refused(lambda: open_dataset(str(tmp_path / "mixed"), "test"), "beside class folders", "'a.png'", "'cat'")
    save(tmp_path / "splits" / "train" / "a.png", pixels)
    save(tmp_path / "splits" / "dog" / "b.png", pixels)
    refused(lambda: open_dataset(str(tmp_path / "splits"), "test"), "train/ beside other entries", "'dog'")
    (tmp_path / "splits" / "dog" / "b.png").unlink()
    (tmp_path / "splits" / "dog").rmdir()
    refused(lambda: open_dataset(str(tmp_path / "splits"), "test"), "has no test/ folder", "--split train")
    refused(lambda: open_splits(str(tmp_path / "mixed" / "cat"), "both"), "single split", "--split train")


def test_links_are_followed_only_inside_the_folder(tmp_path: Path, digits) -> None:
    x, _ = digits
    outside = save(tmp_path / "outside" / "secret.png", x[0])
    root = tmp_path / "d"
    save(root / "pool" / "a.png", x[1])
    (root / "cls").mkdir()
    (root / "cls" / "a.png").symlink_to(root / "pool" / "a.png")  # stays inside: followed
    got, y = read_all(open_dataset(str(root), "test", images=ImageOptions((1, 28, 28))))
    assert y.tolist() == [0, 1] and np.array_equal(got, x[[1, 1]])

    (root / "cls" / "b.png").symlink_to(outside)
    message = refused(lambda: open_dataset(str(root), "test"), "'cls/b.png'", "leads outside the data folder")
    assert str(tmp_path) not in message
    (root / "cls" / "b.png").unlink()
    (root / "cls" / "up").symlink_to(tmp_path / "outside", target_is_directory=True)
    refused(lambda: open_dataset(str(root), "test"), "'cls/up'", "leads outside the data folder")
    (root / "cls" / "up").unlink()
    (root / "cls" / "loop").symlink_to(root / "cls", target_is_directory=True)
    refused(lambda: open_dataset(str(root), "test"), "link cycle")


def test_settings_that_cannot_apply_are_refused(tmp_path: Path, digits) -> None:
    x, _ = digits
    save(tmp_path / "d" / "a.png", x[0])
    np.save(tmp_path / "x.npy", x[:3])
    refused(lambda: ImageOptions(resize=0), "--resize must be between 1 and 32768")
    refused(lambda: ImageOptions(crop=10**6), "--crop must be between")
    for options, fragment in [
        (ImageOptions(("n", 3, 224, 224), crop=200), "--crop 200 makes 200×200 images but the model input takes 224"),
        (ImageOptions(("n", 3, 224, 224), resize=100), "--resize 100 is smaller than the 224×224 crop"),
        (ImageOptions(crop=20, resize=10), "--resize 10 is smaller than the 20×20 crop"),
        (ImageOptions(("n", 10)), "this model's input is n×10"),
        (ImageOptions(("n", 5, 8, 8)), "with C = 1 or 3"),
    ]:
        refused(lambda options=options: open_dataset(str(tmp_path / "d"), "test", images=options), fragment)
    for spec in (str(tmp_path / "x.npy"), "mnist"):
        refused(
            lambda spec=spec: open_dataset(spec, "test", images=ImageOptions(skip_bad=True)),
            "apply to image folders",
        )
    assert open_dataset(str(tmp_path / "x.npy"), "test", images=ImageOptions(("n", 1, 28, 28))).count == 3


def test_a_dataset_name_wins_over_a_folder_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path / "mnist" / "a.png", np.zeros((28, 28), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert open_dataset("mnist", "test", limit=5).name == "mnist"
    assert open_dataset("./mnist", "test").count == 1


@pytest.mark.filterwarnings("error")  # Pillow warns on these unless they go through RGBA first
@pytest.mark.parametrize("transparency", [b"\x00\x80" + b"\xff" * 254, 0, 7])
@pytest.mark.parametrize(("input_shape", "mode"), [(("n", 28, 28), "L"), (("n", 3, 28, 28), "RGB")])
def test_palette_images_with_transparency_decode_without_a_warning(
    tmp_path: Path, transparency: bytes | int, input_shape: tuple, mode: str
) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "palette"
    folder.mkdir()
    for i in range(3):
        image = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        image.save(folder / f"{i}.png", transparency=transparency)
    got, _ = read_all(open_dataset(str(folder), "test", images=ImageOptions(input_shape)))
    for i in range(3):
        with Image.open(folder / f"{i}.png") as opened:
            expected = np.asarray(opened.convert("RGBA").convert(mode))
        assert np.array_equal(got[i], expected if mode == "L" else np.moveaxis(expected, -1, 0))
