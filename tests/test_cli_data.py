import json

import pytest

from bnlab.cli import main
from conftest import FMNIST_DIR, make_idx_dataset


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_and_text(capsys, tmp_path):
    d = make_idx_dataset(tmp_path / "m", n_train=30, n_test=10)
    code, out, _ = run(capsys, "data", "info", "mnist", "--data-dir", str(d), "--json")
    info = json.loads(out)
    assert code == 0 and info["train"] == 30 and info["test"] == 10 and info["input_shape"] == [1, 28, 28]
    assert info["location"] == str(d)
    code, out, _ = run(capsys, "data", "info", "iris")
    assert code == 0 and "train 112, test 38" in out and "setosa" in out


def test_show_writes_png(capsys, tmp_path):
    out_png = tmp_path / "sub" / "grid.png"
    code, out, _ = run(capsys, "data", "show", "digits", "-o", str(out_png), "-n", "9")
    assert code == 0 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_iris_is_clean_error(capsys, tmp_path):
    code, _, err = run(capsys, "data", "show", "iris", "-o", str(tmp_path / "g.png"))
    assert code == 2 and err.startswith("bnlab: error: iris holds feature vectors") and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv,needle", [
    (["data", "info", "nope"], "unknown dataset 'nope'"),
    (["data", "info", "mnist", "--data-dir", "/does/not/exist"], "--data-dir /does/not/exist does not exist"),
    (["data", "info", "cifar10", "--data-dir", "/tmp"], "does not hold cifar10"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err and err.startswith("bnlab: error:") and err.count("\n") == 1


def test_list_json(capsys):
    code, out, _ = run(capsys, "data", "list", "--json")
    names = [r["name"] for r in json.loads(out)]
    assert code == 0 and names[:3] == ["fashion-mnist", "mnist", "cifar10"] and "iris" in names


def test_installed_console_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "bnlab"
    r = subprocess.run([str(exe), "data", "info", "mnist", "--data-dir", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("bnlab: error:") and "Traceback" not in r.stderr
