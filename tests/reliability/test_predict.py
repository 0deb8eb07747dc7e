"""`bnlab predict` says what it did to each picture, warns when the picture is unlike the training
data, inverts dark-on-light pictures for MNIST-style models, and reports bad files one by one."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from bnlab.cli import main
from bnlab.data import Standardizer, write_idx
from bnlab.data.imagefolder import load_image
from bnlab.errors import ConfigError, DataFormatError, DataNotFoundError
from bnlab.train import TrainSettings, load_checkpoint, predict_images, train
from bnlab.train.evaluate import prepare_image


def mnist_like(n, rng):
    """Light squares on a black background, like MNIST's strokes: training mean about 0.1 of 255."""
    x = np.zeros((n, 28, 28), np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    for i, label in enumerate(y):
        top = 4 + int(label)
        x[i, top:top + 10, 8:20] = rng.integers(180, 256)
    return x, y


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("mnist")
    for prefix, n in (("train", 200), ("t10k", 20)):
        x, y = mnist_like(n, rng)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
    path = d / "m.pt"
    train(TrainSettings(dataset="mnist", data_dir=str(d), model="keras-mlp", bn="after", batch_size=50, epochs=1),
          checkpoint=path)
    return path


@pytest.fixture(scope="module")
def ckpt(ckpt_path):
    return load_checkpoint(ckpt_path)


def save(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def digit(light_on_dark=True):
    x = np.zeros((28, 28), np.uint8)
    x[6:16, 8:20] = 230
    return x if light_on_dark else 255 - x


def fake_checkpoint(standardizer, dataset="mnist"):
    """What prepare_image reads of a checkpoint, without training one."""
    return SimpleNamespace(input_shape=(1, 28, 28), settings={"dataset": dataset}, standardizer=standardizer)


def test_training_like_picture_is_neither_inverted_nor_flagged(ckpt, tmp_path):
    (r,) = predict_images(ckpt, [save(tmp_path / "d.png", digit())])
    assert r["warnings"] == [] and r["preprocess"]["inverted"] is False
    assert r["preprocess"] == {"original_size": [28, 28], "mode": "L", "converted_to": None, "resized_to": None,
                               "padded_to": None, "inverted": False, "invert_reason": r["preprocess"]["invert_reason"]}
    assert r["preprocess"]["invert_reason"] == "not a light background (border median 0.00)"


def test_plain_grey_picture_gets_a_warning(ckpt, tmp_path, capsys):
    p = save(tmp_path / "grey.png", np.full((40, 100), 128))
    (r,) = predict_images(ckpt, [p])
    assert len(r["warnings"]) == 1 and "far from the training data" in r["warnings"][0]
    assert "plain" in r["warnings"][0] and "unreliable" in r["warnings"][0]
    assert main(["predict", str(ckpt.path), str(p)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{p}: ") and out[1].startswith("  100x40 L, resized to 28x11, padded to 28x28")
    assert out[2].startswith("  warning: far from the training data")


def test_dark_on_light_picture_is_inverted_automatically(ckpt, tmp_path, capsys):
    p = save(tmp_path / "paper.png", np.stack([digit(light_on_dark=False)] * 3, axis=-1))  # RGB photo of paper
    light = predict_images(ckpt, [save(tmp_path / "d.png", digit())], top_k=10)[0]
    (auto,) = predict_images(ckpt, [p], top_k=10)
    pre = auto["preprocess"]
    assert pre["inverted"] is True and pre["mode"] == "RGB" and pre["converted_to"] == "L"
    assert "light background (border median 1.00)" in pre["invert_reason"]
    assert auto["warnings"] == [] and auto["top"] == light["top"]  # exactly the light-on-dark picture
    (kept,) = predict_images(ckpt, [p], invert="no")
    assert kept["preprocess"]["inverted"] is False and kept["preprocess"]["invert_reason"] == "requested: invert=no"
    assert len(kept["warnings"]) == 1 and "try --invert yes" in kept["warnings"][0]
    assert main(["predict", str(ckpt.path), str(p), "--invert", "no", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["preprocess"]["inverted"] is False
    # the old bare flag still means yes, even on a light-on-dark picture
    assert main(["predict", str(ckpt.path), str(tmp_path / "d.png"), "--invert"]) == 0
    assert "inverted (requested: invert=yes)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="invert must be one of auto, yes, no"):
        predict_images(ckpt, [p], invert="maybe")


def test_unreadable_file_among_good_ones_is_reported_alone(ckpt, tmp_path, capsys):
    good = [save(tmp_path / f"{i}.png", digit()) for i in range(2)]
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    code = main(["predict", str(ckpt.path), str(good[0]), str(bad), str(good[1])])
    out, err = capsys.readouterr()
    assert code == 2
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == [str(g) for g in good]
    assert err.splitlines() == [f"bnlab: error: {bad} is not an image Pillow can read (PNG, JPEG, BMP, ...)"]
    code = main(["predict", str(ckpt.path), str(good[0]), str(bad), "--json"])
    results = json.loads(capsys.readouterr().out)
    assert code == 2 and "top" in results[0]
    assert results[1] == {"image": str(bad), "error": f"{bad} is not an image Pillow can read (PNG, JPEG, BMP, ...)"}
    # the library raises by default, or reports when asked
    with pytest.raises(DataFormatError, match="notes.png is not an image"):
        predict_images(ckpt, [bad])
    assert [("error" in r) for r in predict_images(ckpt, [bad, good[0]], errors="report")] == [True, False]


def test_all_files_failing_gives_one_line_each(ckpt, tmp_path, capsys):
    missing, junk = tmp_path / "missing.png", tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(ckpt.path), str(missing), str(junk)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"bnlab: error: {missing} cannot be read: No such file or directory",
                                f"bnlab: error: {junk} is not an image Pillow can read (PNG, JPEG, BMP, ...)"]


def test_directories_and_glob_patterns(ckpt, tmp_path, capsys):
    shots = tmp_path / "shots"
    shots.mkdir()
    for name in ("b.png", "a.PNG", "c.jpg"):
        save(shots / name, digit())
    (shots / "notes.txt").write_text("not an image")
    (shots / "sub").mkdir()
    save(shots / "sub" / "deep.png", digit())
    by_dir = predict_images(ckpt, [shots])
    assert [r["image"] for r in by_dir] == [str(shots / n) for n in ("a.PNG", "b.png", "c.jpg")]
    by_glob = predict_images(ckpt, [str(shots / "*.png")])
    assert [r["image"] for r in by_glob] == [str(shots / "b.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["predict", str(ckpt.path), str(shots / "*.gif"), str(empty), str(shots / "[bc].*")])
    out, err = capsys.readouterr()
    assert code == 2 and [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == [
        str(shots / "b.png"), str(shots / "c.jpg")]
    assert err.splitlines() == [f"bnlab: error: pattern {shots / '*.gif'} matches no files",
                                f"bnlab: error: directory {empty} has no image files "
                                "(.bmp, .gif, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)"]
    with pytest.raises(DataNotFoundError, match="matches no files"):
        predict_images(ckpt, [str(shots / "*.gif")])


def bar_picture():
    """100x40 black picture with a white vertical bar from top to bottom."""
    x = np.zeros((40, 100), np.uint8)
    x[:, 45:55] = 255
    return x


def test_aspect_ratio_is_kept_by_padding(ckpt, tmp_path):
    p = save(tmp_path / "bar.png", bar_picture())
    img = load_image(p, 28, 1, keep_aspect=True)
    assert img.resized_to == (28, 11) and img.padded_to == (28, 28) and img.background == (0.0,)
    rows = np.flatnonzero(img.pixels[0].max(axis=1) > 0)
    assert rows.tolist() == list(range(8, 19))  # the bar keeps its height: 11 of 28 rows, centred
    stretched = load_image(p, 28, 1).pixels[0]
    assert (stretched.max(axis=1) > 0).all()  # what stretching does: the bar runs over the whole height
    x, steps, _ = prepare_image(ckpt, p)
    assert steps["resized_to"] == [28, 11] and steps["padded_to"] == [28, 28]
    background = (0 - ckpt.standardizer.mean[0]) / ckpt.standardizer.std[0]
    assert np.allclose(x[0, 0, :8].numpy(), background) and np.allclose(x[0, 0, 19:].numpy(), background)


def test_padding_uses_the_pictures_own_background(tmp_path):
    x = np.full((40, 100), 240, np.uint8)  # a light sheet with a dark bar
    x[10:30, 40:60] = 20
    img = load_image(save(tmp_path / "sheet.png", x), 28, 1, keep_aspect=True)
    assert img.background == (240.0,) and (img.pixels[0, :8] == 240).all()


def test_image_folder_checkpoints_stretch_like_their_training_data(tmp_path):
    fake = fake_checkpoint(Standardizer("zscore", (100.0,), (50.0,)), dataset="image-folder")
    _, steps, _ = prepare_image(fake, save(tmp_path / "bar.png", bar_picture()))
    assert steps["resized_to"] == [28, 28] and steps["padded_to"] is None


@pytest.mark.parametrize("standardizer, inverted, reason", [
    (Standardizer("zscore", (30.0,), (70.0,)), True, "light background (border median 1.00)"),
    (Standardizer("zscore", (200.0,), (70.0,)), False, "the training images are not dark (mean 0.78)"),
    (Standardizer("scale", (0.0,), (255.0,)), False, "does not record the training mean (standardize=scale)"),
])
def test_auto_inverts_only_for_dark_training_images(tmp_path, standardizer, inverted, reason):
    _, steps, _ = prepare_image(fake_checkpoint(standardizer), save(tmp_path / "paper.png", digit(light_on_dark=False)))
    assert steps["inverted"] is inverted and reason in steps["invert_reason"]


def test_flat_picture_is_flagged_without_zscore_statistics(tmp_path):
    fake = fake_checkpoint(Standardizer("scale", (0.0,), (255.0,)))
    _, _, warns = prepare_image(fake, save(tmp_path / "grey.png", np.full((40, 100), 128)))
    assert len(warns) == 1 and "plain" in warns[0]
    _, _, warns = prepare_image(fake, save(tmp_path / "d.png", digit()))
    assert warns == []
