"""Outputs never destroy inputs, and unwritable or full locations fail before any model loads.

Unwritable locations are made so that root is refused too (CI runs as root, which ignores
permission bits): a parent that is a file, ``/sys`` (kernel-refused), and — where this machine
allows mounting — a read-only tmpfs and a tiny full tmpfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app
from napari_pathfm.errors import DiskFullError, OutputError
from napari_pathfm.io.preflight import Output, check_outputs

runner = CliRunner()
PATHFM = Path(sys.executable).with_name("pathfm")
BUNDLED = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data"


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, filled up; skipped where this machine does not let the test mount one."""
    where = tmp_path / "tiny"
    if not _mount_tmpfs(where, "size=1m"):
        pytest.skip("mounting a tmpfs is not allowed here (needs root / CAP_SYS_ADMIN)")
    try:
        with open(where / "filler", "wb") as f:
            try:
                f.write(b"\0" * (2 << 20))
            except OSError:
                pass
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only_fs(tmp_path):
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, "ro,size=1m"):
        pytest.skip("mounting a tmpfs is not allowed here (needs root / CAP_SYS_ADMIN)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_output_equal_to_an_input_is_refused_and_the_input_kept(tmp_path):
    slide = tmp_path / "slide.ome.tif"
    slide.write_bytes(b"precious")
    with pytest.raises(OutputError, match="is an input of this run"):
        check_outputs([slide], [slide])
    link = tmp_path / "link.ome.tif"
    os.link(slide, link)  # a hard link is the same file under another name
    with pytest.raises(OutputError, match="link.ome.tif"):
        check_outputs([link], [slide])
    sym = tmp_path / "sym.ome.tif"
    sym.symlink_to(slide)
    with pytest.raises(OutputError):
        check_outputs([sym], [slide])
    ckpt = tmp_path / "model.safetensors"
    with pytest.raises(OutputError, match="model.json"):  # a checkpoint's card is an input too
        check_outputs([Output(tmp_path, folder=True, names=("model.json",))], [ckpt])
    assert slide.read_bytes() == b"precious"


def test_outputs_inside_an_input_folder_are_refused(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    with pytest.raises(OutputError, match="inside the input folder"):
        check_outputs([Output(stack / "translated", folder=True)], input_folders=[stack])
    check_outputs([Output(tmp_path / "translated", folder=True)], input_folders=[stack])
    assert (tmp_path / "translated").is_dir() and not list((tmp_path / "translated").iterdir())


def test_unwritable_locations_fail_fast_even_for_root(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_outputs([afile / "sub" / "mask.ome.tif"])
    with pytest.raises(OutputError, match="not writable|read-only"):
        check_outputs([Path("/sys/pathfm/mask.ome.tif")])
    with pytest.raises(OutputError, match="needs a file name"):
        check_outputs([tmp_path])
    with pytest.raises(OutputError, match="needs a folder"):
        check_outputs([Output(afile, folder=True)])


def test_read_only_mount_is_refused(read_only_fs):
    with pytest.raises(OutputError, match="read-only"):
        check_outputs([read_only_fs / "out" / "mask.ome.tif"])


def test_a_full_file_system_is_refused(tiny_fs):
    with pytest.raises(DiskFullError, match="no space left|MB free"):
        check_outputs([tiny_fs / "mask.ome.tif"])
    assert not [p for p in tiny_fs.iterdir() if p.name.startswith(".pathfm-probe")]


def test_plenty_of_space_needed_is_checked(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskFullError, match="needs about"):
        check_outputs([tmp_path / "big.ome.tif"], need_bytes=free * 4)


def test_cli_segment_over_its_input_is_refused_in_under_a_second(tmp_path):
    slide = tmp_path / "CMU-1-Small-Region.svs"
    shutil.copyfile(BUNDLED / "CMU-1-Small-Region.svs", slide)
    before = slide.read_bytes()
    t0 = time.perf_counter()
    done = subprocess.run([str(PATHFM), "segment", str(slide), "--out", str(slide)], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2 and "is an input of this run" in done.stderr and "Traceback" not in done.stderr
    assert slide.read_bytes() == before
    assert elapsed < 5.0, elapsed  # a fresh interpreter; the check itself is ~0.05 s (benchmarks/faults.py)


@pytest.mark.parametrize(
    "args",
    [
        lambda t, s: ["segment", str(s), "--out", str(t / "afile" / "mask.ome.tif")],
        lambda t, s: ["classify", str(s), "-c", "none.safetensors", "--out", str(t / "afile" / "classified")],
        lambda t, s: ["tiles", str(s), "--out", str(t / "afile")],
        lambda t, s: ["features", str(s), "--out", str(t / "afile" / "features")],
        lambda t, s: [
            "mil",
            "predict",
            "-c",
            "x.safetensors",
            "--slide",
            str(s),
            "--out",
            str(t / "afile" / "h.ome.tif"),
        ],
    ],
)
def test_cli_commands_check_outputs_before_loading_anything(tmp_path, args):
    (tmp_path / "afile").write_text("in the way")
    slide = BUNDLED / "CMU-1-Small-Region.svs"
    result = runner.invoke(app, args(tmp_path, slide))
    assert result.exit_code == 2, result.output
    assert "afile" in result.output and "Traceback" not in result.output
    assert (tmp_path / "afile").read_text() == "in the way"


def test_cli_translate_into_its_own_stack_is_refused(tmp_path):
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "plane.tif").write_bytes(b"")
    result = runner.invoke(app, ["translate", str(stack), "-c", "x.safetensors", "--out", str(stack)])
    assert result.exit_code == 2 and "input" in result.output
    assert sorted(p.name for p in stack.iterdir()) == ["plane.tif"]


def test_cli_train_into_its_data_or_over_its_weights_is_refused(tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "training" / "classify" / "crc_tiny.yaml"
    from napari_pathfm.training.recipes import load_recipe

    data = [
        v
        for k, v in _flat(load_recipe(recipe).config)
        if k.startswith("data.") and isinstance(v, str) and Path(v).is_dir()
    ]
    if not data:
        pytest.skip("the CRC tiles of ../shared/data are not here")
    result = runner.invoke(app, ["train", str(recipe), "--out", str(Path(data[0]) / "run")])
    assert result.exit_code == 2 and "inside the input folder" in result.output


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_messages_name_paths_as_given_not_resolved_through_links(tmp_path):
    real = tmp_path / "real-stack"
    real.mkdir()
    link = tmp_path / "stack-link"
    link.symlink_to(real)
    with pytest.raises(OutputError) as err:
        check_outputs([Output(link / "out", folder=True)], input_folders=[link])
    assert str(link / "out") in str(err.value) and f"input folder {link}" in str(err.value)
