"""The one error boundary: every failure of a `pathfm` command is one plain message and an exit code.

The OS errors here are real ones (a read-only mount, a full tmpfs, a parent that is a file,
permission bits where the test user honours them), raised by the kernel, not constructed.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app
from napari_pathfm.error_boundary import describe, message_for
from napari_pathfm.errors import (
    Cancelled,
    CheckpointError,
    DiskFullError,
    InputError,
    OutputError,
    PathFMError,
    RecipeError,
    SlideError,
    UsageError,
)

runner = CliRunner()
PATHFM = Path(sys.executable).with_name("pathfm")


def _kernel_error(fn) -> OSError:
    try:
        fn()
    except OSError as exc:
        return exc
    raise AssertionError("expected the kernel to refuse")


def test_kinds_have_exit_codes_and_name_the_file():
    assert describe(SlideError("a.svs", "cannot be read.", "Convert it.")).exit_code == 2
    assert describe(CheckpointError("m.safetensors", "holds NaN.")).exit_code == 2
    assert describe(OutputError("out", "is not writable.")).exit_code == 2
    assert describe(DiskFullError("out", "is full.")).exit_code == 1
    assert describe(Cancelled("stopped")).exit_code == 130
    assert describe(KeyboardInterrupt()).exit_code == 130
    assert describe(PathFMError("a runtime failure")).exit_code == 1
    msg = describe(RecipeError("r.yaml", "unknown key 'x'.", "Did you mean 'y'?"))
    assert msg.text == "r.yaml: unknown key 'x'. Did you mean 'y'?" and msg.kind == "input"
    assert describe(UsageError("--fractions needs three numbers.")).text == "--fractions needs three numbers."
    assert isinstance(SlideError("a", "b"), InputError) and not isinstance(CheckpointError("a", "b"), SlideError)


def test_real_os_errors_become_one_sentence(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    not_dir = _kernel_error(lambda: (afile / "sub").mkdir())
    msg = describe(not_dir)
    assert msg.exit_code == 2 and str(afile / "sub") in msg.text and "is a file" in msg.text
    missing = _kernel_error(lambda: open(tmp_path / "nope.csv"))  # noqa: SIM115 - fails: no file to close
    assert describe(missing).text == f"{tmp_path / 'nope.csv'}: file or folder not found. Check the path."
    is_dir = _kernel_error(lambda: open(tmp_path, "rb"))  # noqa: SIM115 - fails: no file to close
    assert "is a folder where a file was expected" in describe(is_dir).text
    exists = _kernel_error(lambda: os.mkdir(afile))
    assert describe(exists).exit_code == 2 and "already exists" in describe(exists).text
    sys_err = _kernel_error(lambda: open("/sys/pathfm-probe", "w"))  # noqa: SIM115 - fails: no file to close
    assert sys_err.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
    assert describe(sys_err).exit_code == 2 and "/sys/pathfm-probe" in describe(sys_err).text


def test_undecodable_text_yaml_and_oom_are_plain():
    bad = _text_error = None
    try:
        b"slide\nsl\xe9de.svs\n".decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc
    text = describe(bad).text
    assert "not UTF-8" in text and "0xe9" in text and describe(bad).exit_code == 2
    import yaml

    try:
        yaml.safe_load("a: [1, 2\nb: 3")
    except yaml.YAMLError as exc:
        _text_error = exc
    assert "not valid YAML" in describe(_text_error).text and "line" in describe(_text_error).text
    oom = describe(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.exit_code == 1 and "--batch-size" in oom.text
    assert describe(MemoryError()).kind == "resource"


def test_unexpected_errors_say_so_and_debug_shows_the_traceback():
    try:
        {}["missing"]
    except KeyError as exc:
        err = exc
    msg = describe(err)
    assert msg.unexpected and msg.exit_code == 1 and "--debug" in msg.text
    assert "Traceback" not in message_for(err, debug=False)
    assert "Traceback" in message_for(err, debug=True)


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["open", "/no/such/slide.svs"], 2, ["/no/such/slide.svs", "does not exist"]),
        (["segment", "/no/such/slide.svs", "--out", "/sys/mask.ome.tif"], 2, ["/sys", "not writable"]),
        (["mil", "predict", "-c", "x.safetensors"], 2, ["exactly one of --slide or --features"]),
    ],
)
def test_cli_errors_are_one_message_with_the_exit_code(args, code, words):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    env = {**os.environ, "PATHFM_DEBUG": "0"}
    plain = subprocess.run([str(PATHFM), "open", str(tmp_path / "gone.svs")], capture_output=True, text=True, env=env)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "gone.svs" in plain.stderr
    debug = subprocess.run(
        [str(PATHFM), "--debug", "open", str(tmp_path / "gone.svs")], capture_output=True, text=True, env=env
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "gone.svs" in debug.stderr.splitlines()[-1]
    env["PATHFM_DEBUG"] = "1"
    by_env = subprocess.run([str(PATHFM), "open", str(tmp_path / "gone.svs")], capture_output=True, text=True, env=env)
    assert by_env.returncode == 2 and "Traceback" in by_env.stderr


def test_a_bad_set_value_and_a_broken_recipe_are_named(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "training" / "classify" / "crc_tiny.yaml"
    bad = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", "trainer.max_epochs=[1"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "max_epochs" in bad.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("family: classify\nmodel: [resnet\n", encoding="utf-8")
    res = runner.invoke(app, ["train", str(broken), "--out", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "broken.yaml" in res.output and "YAML" in res.output
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("family: classify\ndescription: \xe9t\xe9\n".encode("latin-1"))
    res = runner.invoke(app, ["train", str(latin), "--out", str(tmp_path / "run3")])
    assert res.exit_code == 2 and "Traceback" not in res.output and "UTF-8" in res.output
    assert "latin.yaml" in res.output and "line 2" in res.output


def test_disk_full_during_an_atomic_write_names_the_output_and_leaves_nothing(tmp_path):
    import shutil

    from napari_pathfm.io.atomic import atomic_path

    where = tmp_path / "tiny"
    where.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs is not allowed here (needs root / CAP_SYS_ADMIN)")
    try:
        final = where / "mask.ome.tif"
        with pytest.raises(OSError) as err, atomic_path(final) as tmp, open(tmp, "wb") as f:
            f.write(b"\0" * (1 << 20))  # the kernel refuses past 256 KB
        assert err.value.errno == errno.ENOSPC
        msg = describe(err.value)
        assert msg.text.startswith(f"{final}: no space left") and msg.exit_code == 1
        assert list(where.iterdir()) == [], "the temporary is removed and no partial output is left"
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
