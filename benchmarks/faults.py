"""Fault battery: bad inputs, damaged stores and crashes, run through the `pathfm` CLI as a user would.

Each case makes a real fault on disk (a damaged cache chunk, a truncated plane, a checkpoint with
NaN weights, an output over its input, a full file system, a kill -9 mid-run ...), runs the real
command in a subprocess, and sorts what happened into one of:

- ``correct result``  exit 0 and the output is what a run without the fault gives (bit for bit
  where the case says so);
- ``clear error``     non-zero exit with the expected code, one short message naming the file, no
  traceback, and nothing the user made changed;
- ``unclear error``   it failed without a traceback, but the message does not name the file or the
  exit code is not the one the kind of failure should give;
- ``traceback``       a Python traceback reached the user;
- ``silent wrong``    exit 0 with a result that differs from the right one (or an input damaged).

The table ends with a total line; the promise (docs/reliability.md) is 0 traceback and 0 silent
wrong. Run::

    .venv/bin/python benchmarks/faults.py            # every case (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/faults.py --quick    # only the cases that run no model (~30 s)
    .venv/bin/python benchmarks/faults.py --json faults.json

Shared data (broken slides, the ISL z-stack) come from ``../shared/data`` (``PATHFM_SHARED_DATA``);
cases that need what is absent are listed as ``skipped``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "napari_pathfm" / "data"
SLIDE = BUNDLED / "CMU-1-Small-Region.svs"
SEG_MODEL = BUNDLED / "models" / "pathsam2-glas-small.safetensors"
SHARED = Path(os.environ.get("PATHFM_SHARED_DATA", REPO.parent / "shared" / "data"))
PATHFM = Path(sys.executable).with_name("pathfm")
OUTCOMES = ("correct result", "clear error", "unclear error", "traceback", "silent wrong", "skipped")


@dataclass
class Run:
    """One finished subprocess."""

    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Result:
    group: str
    case: str
    outcome: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[[Bench], tuple[str, str]]
    model: bool  # runs a model (slow); --quick leaves these out


CASES: list[Case] = []


def case(group: str, name: str, *, model: bool = False):
    def register(fn):
        CASES.append(Case(group, name, fn, model))
        return fn

    return register


class Skip(Exception):
    """The case needs something this machine or checkout lacks."""


@dataclass
class Bench:
    """The workspace of one battery run: a temp folder, a private cache, reference results."""

    root: Path
    refs: dict = field(default_factory=dict)

    def env(self, **extra) -> dict:
        env = {**os.environ, "PATHFM_CACHE_DIR": str(self.root / "cache")}
        env.pop("PATHFM_DEBUG", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *args, timeout: float = 600, env: dict | None = None) -> Run:
        t0 = time.perf_counter()
        p = subprocess.run(
            [str(PATHFM), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env(),
            cwd=self.root,
            check=False,
        )  # the cases judge the exit code
        return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)

    def path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def slide_copy(self, name: str = "slide/CMU-1-Small-Region.svs") -> Path:
        dst = self.path(name)
        if not dst.exists():
            shutil.copyfile(SLIDE, dst)
        return dst

    def reference_mask(self) -> bytes:
        """The mask of the bundled slide with the default model and no cache (computed once)."""
        if "mask" not in self.refs:
            out = self.path("ref/mask.ome.tif")
            r = self.run("segment", self.slide_copy(), "--out", out, "--no-cache")
            if r.rc != 0:
                raise RuntimeError(f"reference segment run failed: {r.err[-2000:]}")
            self.refs["mask"] = mask_pixels(out)
        return self.refs["mask"]


def mask_pixels(path: Path) -> bytes:
    import tifffile

    return tifffile.imread(path).tobytes()


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def judge_error(r: Run, names: list[str], code: int = 2, untouched: dict | None = None) -> tuple[str, str]:
    """Classify a run that should have failed with one clear message naming ``names``."""
    msg = r.err.strip().splitlines()[-1] if r.err.strip() else r.out.strip()[-200:]
    if "Traceback (most recent call last)" in r.text:
        return "traceback", msg
    if untouched:
        for p, sha in untouched.items():
            if not Path(p).exists() or digest(p) != sha:
                return "silent wrong", f"{p} was changed or removed"
    if r.rc == 0:
        return "silent wrong", "exit 0 for a run that cannot be right"
    if "internal error" in r.err:
        return "unclear error", msg
    missing = [n for n in names if n not in r.err]
    if missing or r.rc != code:
        return "unclear error", f"exit {r.rc} (want {code}); missing {missing}: {msg}"
    return "clear error", f"exit {r.rc}: {msg}"


def judge_mask(b: Bench, r: Run, out: Path, extra: str = "") -> tuple[str, str]:
    """Classify a run that should have given the reference mask."""
    if "Traceback (most recent call last)" in r.text:
        return "traceback", r.err.strip().splitlines()[-1]
    if r.rc != 0:
        return "unclear error", f"exit {r.rc}: {r.err.strip()[-300:]}"
    if mask_pixels(out) != b.reference_mask():
        return "silent wrong", "the mask differs from a run without the fault"
    return "correct result", ("same mask bit for bit" + (f"; {extra}" if extra else ""))


def stray_temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name or "scratch" in p.name)


# ---------------------------------------------------------------------------------------------
# outputs over inputs, unwritable and full locations
# ---------------------------------------------------------------------------------------------
@case("outputs", "segment --out = the input slide")
def _(b: Bench):
    s = b.slide_copy("over/slide.ome.tif")
    sha = digest(s)
    r = b.run("segment", s, "--out", s)
    return judge_error(r, [str(s)], untouched={s: sha})


@case("outputs", "segment --out = a hard link to the input")
def _(b: Bench):
    s = b.slide_copy("link/slide.svs")
    link = b.path("link/mask.ome.tif")
    if not link.exists():
        os.link(s, link)
    r = b.run("segment", s, "--out", link)
    return judge_error(r, ["mask.ome.tif"], untouched={s: digest(s)})


@case("outputs", "distill --out = one of its input checkpoints")
def _(b: Bench):
    ck = b.path("ckdir/model.safetensors")
    shutil.copyfile(SEG_MODEL, ck)
    shutil.copyfile(SEG_MODEL.with_suffix(".json"), ck.with_suffix(".json"))
    r = b.run("distill", ck, ck, "--out", ck)
    return judge_error(
        r, [str(ck)], untouched={ck: digest(ck), ck.with_suffix(".json"): digest(ck.with_suffix(".json"))}
    )


@case("outputs", "translate --out inside the z-stack folder")
def _(b: Bench):
    stack = SHARED / "isl-blue-sample"
    if not stack.is_dir():
        raise Skip("no ISL z-stack in shared data")
    before = sorted(p.name for p in stack.iterdir())
    r = b.run("translate", stack, "-c", BUNDLED / "models" / "haste-isl-dapi.safetensors", "--out", stack / "out")
    res = judge_error(r, [str(stack)])
    if sorted(p.name for p in stack.iterdir()) != before:
        return "silent wrong", "files were added to the z-stack folder"
    return res


@case("outputs", "output parent is a file (unwritable even for root)")
def _(b: Bench):
    f = b.path("afile")
    f.write_text("x")
    r = b.run("segment", b.slide_copy(), "--out", f / "sub" / "mask.ome.tif")
    res = judge_error(r, [str(f)])
    if res[0] == "clear error" and r.seconds > 2.0:
        return "unclear error", f"found only after {r.seconds:.1f} s"
    return res[0], res[1] + f" ({r.seconds:.2f} s)"


@case("outputs", "output on a kernel read-only location (/sys)")
def _(b: Bench):
    r = b.run("segment", b.slide_copy(), "--out", "/sys/pathfm/mask.ome.tif")
    return judge_error(r, ["/sys"])


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, check=False)
    if p.returncode != 0:
        raise Skip("cannot mount a tmpfs here")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)  # best effort: cleanup


@case("outputs", "output on a read-only mount")
def _(b: Bench):
    where = b.root / "ro"
    _mount(where, "ro,size=1m")
    try:
        return judge_error(b.run("segment", b.slide_copy(), "--out", where / "mask.ome.tif"), [str(where)])
    finally:
        _umount(where)


@case("outputs", "output on a full file system")
def _(b: Bench):
    where = b.root / "full"
    _mount(where, "size=1m")
    try:
        with open(where / "filler", "wb") as f:
            try:
                f.write(b"\0" * (2 << 20))
            except OSError:
                pass
        return judge_error(b.run("segment", b.slide_copy(), "--out", where / "mask.ome.tif"), [str(where)], code=1)
    finally:
        _umount(where)


@case("outputs", "disk fills up during the run (ENOSPC mid-run)", model=True)
def _(b: Bench):
    where = b.root / "fills"
    _mount(where, "size=16m")
    try:
        out = where / "seg" / "mask.ome.tif"
        p = subprocess.Popen(
            [str(PATHFM), "segment", str(b.slide_copy()), "--out", str(out), "--no-cache"],
            env=b.env(),
            cwd=b.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        t0 = time.time()  # another program fills the disk once the run is past its preflight check
        while time.time() - t0 < 60 and not out.parent.is_dir():
            time.sleep(0.05)
        time.sleep(1.0)
        with open(where / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        stdout, stderr = p.communicate(timeout=600)
        r = Run(p.returncode, stdout, stderr, time.time() - t0)
        if r.rc == 0:
            return "silent wrong", "exit 0 although the disk was full"
        res = judge_error(r, ["no space"], code=1)
        left = [n for n in stray_temps(where) if "filler" not in n] + ([out.name] if out.exists() else [])
        return ("unclear error", f"left behind: {left}") if left and res[0] == "clear error" else res
    finally:
        _umount(where)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
@case("inputs", "slide does not exist")
def _(b: Bench):
    return judge_error(b.run("segment", b.root / "nope.svs", "--out", b.path("o/m.ome.tif")), ["nope.svs"])


@case("inputs", "broken slides of shared data (pathfm open)")
def _(b: Bench):
    folder = SHARED / "wsi"
    names = [n for n in ("unopenable.tiff", "unreadable.svs") if (folder / n).exists()]
    if not names:
        raise Skip("no broken slides in shared data")
    worst = ("clear error", "")
    for n in names:
        res = judge_error(b.run("open", folder / n), [n])
        if res[0] != "clear error":
            return res
        worst = (res[0], worst[1] + f"{n}: {res[1]}; ")
    return worst


@case("inputs", "slide with zeroed tiles half-way", model=True)
def _(b: Bench):
    data = bytearray(SLIDE.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200_000] = bytes(200_000)
    broken = b.path("broken/broken.svs")
    broken.write_bytes(bytes(data))
    return judge_error(b.run("segment", broken, "--out", b.path("broken/out/m.ome.tif"), "--no-cache"), ["broken.svs"])


@case("inputs", "all-NaN float32 image")
def _(b: Bench):
    import numpy as np
    import tifffile

    p = b.path("nan/nan.tif")
    tifffile.imwrite(p, np.full((512, 512, 3), np.nan, np.float32))
    return judge_error(b.run("segment", p, "--image-mpp", "0.5", "--out", b.path("nan/out/m.ome.tif")), ["nan.tif"])


@case("inputs", "constant image")
def _(b: Bench):
    import numpy as np
    import tifffile

    p = b.path("const/const.tif")
    tifffile.imwrite(p, np.full((512, 512, 3), 200, np.uint8))
    return judge_error(b.run("segment", p, "--image-mpp", "0.5", "--out", b.path("const/out/m.ome.tif")), ["const.tif"])


def _stack_copy(b: Bench, name: str) -> Path:
    src = SHARED / "isl-blue-sample"
    if not src.is_dir():
        raise Skip("no ISL z-stack in shared data")
    dst = b.root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _planes(stack: Path) -> list[Path]:
    return sorted(p for p in stack.iterdir() if "BRIGHTFIELD" in p.name or "PHASE" in p.name.upper()) or sorted(
        p for p in stack.iterdir() if "z_depth" in p.name
    )


@case("inputs", "z-stack with a truncated plane")
def _(b: Bench):
    stack = _stack_copy(b, "trunc-stack")
    planes = _planes(stack)
    if not planes:
        raise Skip("cannot tell the planes of the ISL sample apart")
    victim = planes[len(planes) // 2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    r = b.run("translate", stack, "-c", BUNDLED / "models" / "haste-isl-dapi.safetensors", "--out", b.path("tr-out"))
    return judge_error(r, [victim.name])


@case("inputs", "z-stack with a plane of another shape")
def _(b: Bench):
    import numpy as np
    from PIL import Image

    stack = _stack_copy(b, "shape-stack")
    planes = _planes(stack)
    if not planes:
        raise Skip("cannot tell the planes of the ISL sample apart")
    victim = planes[1]
    arr = np.asarray(Image.open(victim))
    Image.fromarray(arr[: arr.shape[0] // 2]).save(victim)
    r = b.run("translate", stack, "-c", BUNDLED / "models" / "haste-isl-dapi.safetensors", "--out", b.path("sh-out"))
    return judge_error(r, [victim.name])


@case("inputs", "evaluate-translation with a text file as source")
def _(b: Bench):
    src = b.path("eval/notes.txt")
    src.write_text("not an image\n")
    stack = SHARED / "isl-blue-sample"
    if not stack.is_dir():
        raise Skip("no ISL z-stack in shared data")
    return judge_error(b.run("evaluate-translation", src, "--stack", stack, "--target", "DAPI"), ["notes.txt"])


@case("inputs", "batch manifest in Latin-1")
def _(b: Bench):
    m = b.path("latin/manifest.csv")
    m.write_bytes("slide\nlame-\xe9t\xe9.svs\n".encode("latin-1"))
    return judge_error(b.run("batch", m, "--task", "segment", "--out", b.path("latin/out")), ["manifest.csv", "UTF-8"])


@case("inputs", "train: recipe with a YAML syntax error")
def _(b: Bench):
    rec = b.path("rec/broken.yaml")
    rec.write_text("family: classify\nmodel: [resnet\n")
    return judge_error(b.run("train", rec, "--out", b.path("rec/run")), ["broken.yaml"])


@case("inputs", "train: recipe in Latin-1")
def _(b: Bench):
    rec = b.path("rec/latin.yaml")
    rec.write_bytes("family: classify\ndescription: \xe9t\xe9\n".encode("latin-1"))
    return judge_error(b.run("train", rec, "--out", b.path("rec/run2")), ["latin.yaml"])


@case("inputs", "train: bad --set value")
def _(b: Bench):
    rec = REPO / "training" / "classify" / "crc_tiny.yaml"
    return judge_error(
        b.run("train", rec, "--out", b.path("rec/run3"), "--set", "trainer.max_epochs=[1"), ["max_epochs"]
    )


@case("inputs", "batch: bad --set value")
def _(b: Bench):
    m = b.path("bset/manifest.csv")
    m.write_text(f"slide\n{SLIDE}\n")
    return judge_error(
        b.run("batch", m, "--task", "segment", "--out", b.path("bset/out"), "--set", "batch_size"), ["batch_size"]
    )


# ---------------------------------------------------------------------------------------------
# garbage checkpoints
# ---------------------------------------------------------------------------------------------
def _nan_checkpoint(b: Bench) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(SEG_MODEL)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 16)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    out = b.path("nanck/pathsam2-nan.safetensors")
    save_file(tensors, str(out))
    card = json.loads(SEG_MODEL.with_suffix(".json").read_text())
    card["sha256"] = digest(out)  # a diverged run writes a matching card
    card["weights_file"] = out.name
    out.with_suffix(".json").write_text(json.dumps(card))
    b.refs["nan_tensor"] = name
    return out


@case("checkpoints", "checkpoint with a NaN tensor and a matching card")
def _(b: Bench):
    ck = _nan_checkpoint(b)
    r = b.run("segment", b.slide_copy(), "-c", ck, "--out", b.path("nanck/out/m.ome.tif"))
    return judge_error(r, ["pathsam2-nan", b.refs["nan_tensor"]])


@case("checkpoints", "a .pt pickle given as checkpoint")
def _(b: Bench):
    import torch

    p = b.path("pt/model.pt")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, p)
    return judge_error(b.run("segment", b.slide_copy(), "-c", p, "--out", b.path("pt/out/m.ome.tif")), ["model.pt"])


@case("checkpoints", "weights file edited after its card was written")
def _(b: Bench):
    ck = b.path("edited/model.safetensors")
    data = bytearray(SEG_MODEL.read_bytes())
    data[-100] ^= 0xFF
    ck.write_bytes(bytes(data))
    shutil.copyfile(SEG_MODEL.with_suffix(".json"), ck.with_suffix(".json"))
    return judge_error(b.run("segment", b.slide_copy(), "-c", ck, "--out", b.path("edited/out/m.ome.tif")), ["model"])


@case("checkpoints", "checkpoint without its card")
def _(b: Bench):
    ck = b.path("nocard/model.safetensors")
    shutil.copyfile(SEG_MODEL, ck)
    return judge_error(b.run("segment", b.slide_copy(), "-c", ck, "--out", b.path("nocard/out/m.ome.tif")), ["model"])


@case("checkpoints", "train: an unrelated .safetensors as model.weights", model=True)
def _(b: Bench):
    rec = REPO / "training" / "classify" / "crc_tiny.yaml"
    if not (SHARED / "crc-tiles").is_dir():
        raise Skip("no CRC tiles in shared data")
    unrelated = BUNDLED / "models" / "s4mil-glas-glands-demo.safetensors"
    r = b.run(
        "train",
        rec,
        "--out",
        b.path("unrel/run"),
        "--set",
        f"model.weights={unrelated}",
        "--set",
        "trainer.max_epochs=1",
    )
    return judge_error(r, ["s4mil-glas-glands-demo"])


# ---------------------------------------------------------------------------------------------
# the embedding cache: damage → recomputed, same mask
# ---------------------------------------------------------------------------------------------
def _fill_cache(b: Bench, tag: str) -> tuple[Path, Path]:
    cache = b.root / f"cache-{tag}"
    out = b.path(f"{tag}/first.ome.tif")
    r = b.run("segment", b.slide_copy(), "--out", out, env=b.env(PATHFM_CACHE_DIR=cache))
    if r.rc != 0:
        raise RuntimeError(f"filling the cache failed: {r.err[-500:]}")
    return cache, out


def _chunks(cache: Path, array: str) -> list[Path]:
    return sorted(p for p in cache.glob(f"*/*.zarr/{array}/c/**/*") if p.is_file())


def _damaged_cache_case(b: Bench, tag: str, damage: Callable[[Path], str]) -> tuple[str, str]:
    b.reference_mask()
    cache, _ = _fill_cache(b, tag)
    what = damage(cache)
    out = b.path(f"{tag}/second.ome.tif")
    r = b.run("segment", b.slide_copy(), "--out", out, env=b.env(PATHFM_CACHE_DIR=cache))
    res = judge_mask(b, r, out, what)
    if res[0] == "correct result":
        warn = [line for line in r.err.splitlines() if "cache" in line.lower()]
        if not warn:
            return "unclear error", "right mask but no warning about the damaged cache"
        v = b.run("cache", "verify", "--dir", cache)
        if v.rc != 0:
            return "unclear error", f"right mask, but the entry is not healthy afterwards: {v.out.strip()[-200:]}"
        return res[0], res[1] + f"; warned: {warn[0].strip()[:120]}"
    return res


@case("cache", "bytes flipped in a data chunk", model=True)
def _(b: Bench):
    def flip(cache: Path) -> str:
        chunk = _chunks(cache, "data")[0]
        data = bytearray(chunk.read_bytes())
        for i in range(100, len(data) - 100, max(1, len(data) // 50)):
            data[i] ^= 0x5A
        chunk.write_bytes(bytes(data))
        return f"flipped 50 bytes of {chunk.name}"

    return _damaged_cache_case(b, "flip", flip)


@case("cache", "a data chunk truncated", model=True)
def _(b: Bench):
    def cut(cache: Path) -> str:
        chunk = _chunks(cache, "data")[-1]
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        return f"truncated {chunk.name}"

    return _damaged_cache_case(b, "trunc", cut)


@case("cache", "a data chunk deleted", model=True)
def _(b: Bench):
    def delete(cache: Path) -> str:
        chunk = _chunks(cache, "data")[0]
        chunk.unlink()
        return f"deleted {chunk.name}"

    return _damaged_cache_case(b, "delete", delete)


@case("cache", "the index chunk damaged", model=True)
def _(b: Bench):
    def index(cache: Path) -> str:
        chunk = _chunks(cache, "index")[0]
        data = bytearray(chunk.read_bytes())
        data[8:40] = b"\x00" * 32
        chunk.write_bytes(bytes(data))
        return "zeroed 32 bytes of the index"

    return _damaged_cache_case(b, "index", index)


@case("cache", "an array's zarr.json damaged", model=True)
def _(b: Bench):
    def meta(cache: Path) -> str:
        meta = next(cache.glob("*/*.zarr/data/zarr.json"))
        meta.write_text(meta.read_text()[:40])
        return "cut data/zarr.json"

    return _damaged_cache_case(b, "meta", meta)


@case("cache", "MIL: a damaged feature-extractor chunk", model=True)
def _(b: Bench):
    ck = BUNDLED / "models" / "s4mil-glas-glands-demo.safetensors"

    def predict(tag: str, *extra) -> tuple[Run, dict | None]:
        out = b.path(f"milc/{tag}.json")
        r = b.run(
            "mil",
            "predict",
            "-c",
            ck,
            "--slide",
            b.slide_copy(),
            "--json",
            out,
            *extra,
            env=b.env(PATHFM_CACHE_DIR=b.root / "cache-mil"),
        )
        return r, (json.loads(out.read_text()) if r.rc == 0 else None)

    ref_run, ref = predict("nocache", "--no-cache")
    first_run, first = predict("first")
    if ref is None or first is None:
        return "unclear error", (ref_run.err + first_run.err)[-300:]
    chunks = _chunks(b.root / "cache-mil", "data")
    if not chunks:
        return "unclear error", "the MIL run stored nothing in the cache"
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    chunks[0].write_bytes(bytes(data))
    r, again = predict("second")
    if "Traceback (most recent call last)" in r.text:
        return "traceback", r.err.strip().splitlines()[-1]
    if again is None:
        return "unclear error", r.err[-300:]
    keys = ("probabilities", "predicted")
    if any(again.get(k) != ref.get(k) for k in keys):
        return "silent wrong", f"prediction changed: {again.get('probabilities')} vs {ref.get('probabilities')}"
    if "cache" not in r.err.lower():
        return "unclear error", "same prediction but no warning about the damaged cache"
    return "correct result", f"same probabilities as without the cache; warned: {r.err.strip().splitlines()[-1][:100]}"


# ---------------------------------------------------------------------------------------------
# crashes and resumable outputs
# ---------------------------------------------------------------------------------------------
@case("crashes", "kill -9 of segment mid-run, then rerun", model=True)
def _(b: Bench):
    b.reference_mask()
    folder = b.path("kill/out")
    out = folder / "mask.ome.tif"
    env = b.env(PATHFM_CACHE_DIR=b.root / "cache-kill")
    p = subprocess.Popen(
        [str(PATHFM), "segment", str(b.slide_copy()), "--out", str(out)],
        env=env,
        cwd=b.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.time()
    while time.time() - t0 < 120 and not list((b.root / "cache-kill").rglob("data/c/*")):
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = b.run("segment", b.slide_copy(), "--out", out, env=env)
    res = judge_mask(b, r, out, "rerun after kill -9")
    left = stray_temps(folder)
    if res[0] == "correct result" and left:
        return "unclear error", f"right mask but stray files left: {left}"
    return res


@case("crashes", "Ctrl-C (SIGINT) during segment", model=True)
def _(b: Bench):
    folder = b.path("sigint/out")
    p = subprocess.Popen(
        [str(PATHFM), "segment", str(b.slide_copy()), "--out", str(folder / "mask.ome.tif"), "--no-cache"],
        env=b.env(),
        cwd=b.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    r = Run(p.returncode, out, err, 0.0)
    if r.rc == 0:
        return "correct result", "finished before the signal"
    res = judge_error(r, ["cancel"], code=130)
    if (folder / "mask.ome.tif").exists() or stray_temps(folder):
        return "silent wrong", "a partial mask or temp files were left"
    return res


@case("crashes", "batch: an output behind a done marker damaged", model=True)
def _(b: Bench):
    m = b.path("batchd/manifest.csv")
    m.write_text(f"slide\n{b.slide_copy()}\n")
    out = b.path("batchd/out")
    env = b.env(PATHFM_CACHE_DIR=b.root / "cache-batch")
    first = b.run("batch", m, "--task", "segment", "--out", out, "--workers", "1", env=env)
    if first.rc != 0:
        return "unclear error", f"first batch failed: {first.err[-300:]}"
    masks = [p for p in out.rglob("*.ome.tif") if "tmp" not in p.name]
    if not masks:
        return "unclear error", "first batch wrote no mask"
    masks[0].write_bytes(masks[0].read_bytes()[: masks[0].stat().st_size // 2])
    again = b.run("batch", m, "--task", "segment", "--out", out, "--workers", "1", env=env)
    if "Traceback (most recent call last)" in again.text:
        return "traceback", again.err.strip().splitlines()[-1]
    if again.rc != 0:
        return "unclear error", again.out[-300:]
    if mask_pixels(masks[0]) != b.reference_mask():
        return "silent wrong", "the damaged mask was kept"
    return "correct result", "the slide was redone; same mask as a clean run"


# ---------------------------------------------------------------------------------------------
def run_battery(quick: bool, only: str | None = None, keep: bool = False) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix="pathfm-faults-"))
    bench = Bench(root)
    results = []
    try:
        for c in CASES:
            if (quick and c.model) or (only and only not in c.name and only != c.group):
                continue
            t0 = time.perf_counter()
            try:
                outcome, detail = c.fn(bench)
            except Skip as exc:
                outcome, detail = "skipped", str(exc)
            except Exception as exc:  # noqa: BLE001 - a broken case is reported, not hidden
                outcome, detail = "unclear error", f"the case itself failed: {type(exc).__name__}: {exc}"
            results.append(Result(c.group, c.name, outcome, detail, time.perf_counter() - t0))
            print(f"  {outcome:<15} {c.name}", file=sys.stderr, flush=True)
    finally:
        if not keep:
            for sub in ("ro", "full", "fills"):
                _umount(root / sub)
            shutil.rmtree(root, ignore_errors=True)
    return results


def format_table(results: list[Result]) -> str:
    w = max(len(r.case) for r in results) if results else 10
    lines = [f"{'group':<12} {'case':<{w}}  {'outcome':<15} {'s':>6}  detail", "-" * (w + 60)]
    for r in results:
        lines.append(f"{r.group:<12} {r.case:<{w}}  {r.outcome:<15} {r.seconds:6.1f}  {r.detail[:160]}")
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    lines.append("-" * (w + 60))
    lines.append(f"total {len(results)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the cases that run no model")
    ap.add_argument("--only", help="only cases whose name contains this (or a group name)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the workspace (printed) for inspection")
    args = ap.parse_args(argv)
    results = run_battery(args.quick, args.only, args.keep)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    bad = sum(r.outcome in ("traceback", "silent wrong") for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
