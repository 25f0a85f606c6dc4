"""Files are untrusted data: every malformed data file, checkpoint and registry file is one
line naming the file and the problem, checked before anything large is allocated, and a
FIFO or device never blocks the command."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffuse_engine import DiffuseError, Engine, RegistryError
from diffuse_engine.cli import build_app
from diffuse_engine.components.checkpoint import Checkpoint, CheckpointError

runner = CliRunner()


@pytest.fixture(scope="module")
def engine():
    return Engine(autoload=False)


def load_data(engine, path: Path, timeout: float = 20.0):
    """Build the ``file`` dataset on ``path`` in a thread: a read that blocks fails."""
    result = {}

    def work():
        try:
            result["x"] = engine.build("data", "file", path=str(path)).data
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"reading {path} blocked"
    return result


def data_error(engine, path: Path, needle: str) -> str:
    result = load_data(engine, path)
    exc = result.get("error")
    assert isinstance(exc, DiffuseError), result
    assert needle in str(exc) and "\n" not in str(exc), str(exc)
    return str(exc)


# ---- data files ------------------------------------------------------------------------
def test_malformed_data_files(engine, tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "zip.npz", x=np.zeros((4, 2)))
    (tmp_path / "zip.npz").rename(tmp_path / "zip.npy")
    np.save(tmp_path / "struct.npy", np.zeros(4, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(tmp_path / "str.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(tmp_path / "date.npy", np.array([["2020-01-01"] * 2] * 3, dtype="datetime64[D]"))
    np.save(tmp_path / "wide0.npy", np.zeros((5, 0), np.float32))
    torch.save(torch.zeros(5, 0), tmp_path / "wide0.pt")
    torch.save(torch.eye(3).to_sparse(), tmp_path / "sparse.pt")
    for name, needle in [
        ("empty.npy", "the file is empty (0 bytes)"),
        ("zip.npy", "is a .npz (zip) archive, not an .npy array"),
        ("struct.npy", "holds structured values"),
        ("str.npy", "holds string values"),
        ("date.npy", "holds datetime values"),
        ("wide0.npy", "every dimension >= 1, got shape (5, 0)"),
        ("wide0.pt", "every dimension >= 1, got shape (5, 0)"),
        ("sparse.pt", "sparse"),
    ]:
        data_error(engine, tmp_path / name, needle)


def test_a_meta_tensor_file(engine, tmp_path):
    try:
        torch.save(torch.empty(4, 2, device="meta"), tmp_path / "meta.pt")
    except Exception:  # noqa: BLE001 - a torch that cannot even save one
        pytest.skip("this torch cannot save meta tensors")
    result = load_data(engine, tmp_path / "meta.pt")
    assert isinstance(result.get("error"), DiffuseError), result
    # torch may refuse to load it at all (a generic read error) or hand back the meta
    # tensor, which the reader must name; either way it never becomes training data
    message = str(result["error"])
    assert "meta tensor" in message or "cannot read" in message, message


def test_a_header_claiming_more_rows_than_the_file_holds(engine, tmp_path):
    """10**9 rows (8 GB) claimed, 64 bytes present: refused from the header, nothing
    allocated (mapping or reading it would fail or exhaust memory)."""
    path = tmp_path / "liar.npy"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 2)}
    )
    path.write_bytes(buf.getvalue() + b"\0" * 64)
    assert np.lib.format.read_magic(io.BytesIO(buf.getvalue())) == (1, 0)
    data_error(engine, path, "header claims shape (1000000000, 2) (8,000,000,000 bytes)")


def test_an_npz_member_whose_header_claims_more_than_it_holds(engine, tmp_path):
    """The same lie inside an .npz: the zip directory says 64 bytes, the member's own
    header 10**12 rows; refused from the header before numpy allocates 7 TiB."""
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 2)}
    )
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    data_error(engine, path, "'x' header claims shape (1000000000000, 2)")


def test_fifos_and_devices_never_block(engine, tmp_path):
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    data_error(engine, fifo, "not a regular file")
    (tmp_path / "zeros.npy").symlink_to("/dev/zero")
    data_error(engine, tmp_path / "zeros.npy", "not a regular file")
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "a.png")
    data_error(engine, images, "not a regular file")


def test_a_decompression_bomb_image_is_refused(engine, tmp_path, monkeypatch):
    """Pillow's MAX_IMAGE_PIXELS is the bound; lowered here so a 40x40 image is a bomb."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (40, 40)).save(images / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data_error(engine, images, "1,600 pixels, over Pillow's MAX_IMAGE_PIXELS (1,000)")


def test_a_real_decompression_bomb(engine, tmp_path):
    """A 50 kB PNG that decodes to 400 million pixels: Pillow's own check (above twice
    MAX_IMAGE_PIXELS) fires on open and is reported in one line, nothing decoded."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("1", (20000, 20000)).save(images / "a.png")
    assert (images / "a.png").stat().st_size < 200_000
    data_error(engine, images, "a.png: Image size (400000000 pixels) exceeds limit")


def test_log_likelihood_data_mistakes(engine):
    x = torch.zeros(4, 2)
    x[2, 1] = float("nan")
    with pytest.raises(DiffuseError, match=r"1 of 4 data points contain NaN/Inf \(first: row 2\)"):
        engine.log_likelihood(x)
    with pytest.raises(DiffuseError, match=r"data of shape \(3, 5\) but score model 'gmm'"):
        engine.log_likelihood(torch.zeros(3, 5))


# ---- checkpoints -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "D"
    Engine(autoload=False).training(
        out=out, steps=4, batch_size=16, hidden=16, depth=1, warmup=1, plot_n=0, threads=1
    )
    return out


def tensors_and_meta(path: Path) -> tuple[dict, dict]:
    with safe_open(path / "checkpoint.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["diffuse"])


def crafted(tmp_path: Path, tensors: dict, meta, raw_meta: str | None = None) -> Path:
    out = tmp_path / "crafted"
    out.mkdir(exist_ok=True)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(tensors, out / "checkpoint.safetensors", metadata={"diffuse": text})
    return out


def sample_error(path: Path, needle: str, tmp_path: Path) -> None:
    res = runner.invoke(build_app(), ["sample", "-c", str(path), "-n", "4", "--steps", "2",
                                      "-q", "--out", str(tmp_path / "s")])  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("[1, 2]", "malformed metadata (a JSON list, not an object)"),
        ('"text"', "malformed metadata (a JSON str, not an object)"),
        ("[" * 100000 + "]" * 100000, "malformed metadata (JSON nested too deeply)"),
    ],
)
def test_checkpoint_metadata_that_is_not_an_object(good, tmp_path, raw, needle):
    tensors, _ = tensors_and_meta(good)
    path = crafted(tmp_path, tensors, None, raw)
    with pytest.raises(CheckpointError, match="malformed metadata"):
        Checkpoint.load(path)
    sample_error(path, needle, tmp_path)


def test_checkpoint_with_wrong_shape_or_missing_tensors(good, tmp_path):
    tensors, meta = tensors_and_meta(good)
    key = next(k for k in tensors if k.startswith("model/") and tensors[k].dim() == 2)
    wrong = {**tensors, key: torch.zeros(3, 3)}
    sample_error(crafted(tmp_path, wrong, meta), "1 tensor(s) of the wrong shape", tmp_path)
    missing = {k: v for k, v in tensors.items() if not k.startswith("model/")}
    sample_error(crafted(tmp_path, missing, meta), "missing (model/", tmp_path)


def test_metadata_asking_for_a_far_larger_model_is_refused_before_building_it(
    good, tmp_path, monkeypatch
):
    """The recorded config says hidden = 4096 beside 16-wide tensors: refused from the
    shapes alone; the real (allocating) network is never built."""
    import diffuse_plugins.networks as networks

    tensors, meta = tensors_and_meta(good)
    meta["config"]["score"]["hidden"] = 4096
    built = []
    real = networks.MLPNet.__init__

    def spy(self, dim, c):
        built.append(torch.empty(0).device.type)
        real(self, dim, c)

    monkeypatch.setattr(networks.MLPNet, "__init__", spy)
    path = crafted(tmp_path, tensors, meta)
    sample_error(path, "the recorded config needs [4096", tmp_path)
    assert built and set(built) == {"meta"}  # only ever built on the meta device


def test_bad_optimizer_state_under_resume(good, tmp_path):
    import shutil

    tensors, meta = tensors_and_meta(good)
    key = next(k for k in tensors if k.startswith("optim/") and k.endswith("exp_avg"))
    out = crafted(tmp_path, {**tensors, key: torch.zeros(7)}, meta)
    for name in ("config.json", "status.json"):
        shutil.copy(good / name, out / name)
    res = runner.invoke(build_app(), ["train", "--resume", "--steps", "6", "-q", "--out",
                                      str(out)])  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "cannot restore its training state (ValueError: optimiser state" in res.stderr
    meta["param_groups"] = [{"lr": "x"}]
    crafted(tmp_path, tensors, meta)
    res = runner.invoke(build_app(), ["train", "--resume", "--steps", "6", "-q", "--out",
                                      str(out)])  # fmt: skip
    assert res.exit_code == 2 and "cannot restore its training state" in res.stderr, res.output
    assert Checkpoint.load(out).step == 4  # nothing was written


# ---- registry files --------------------------------------------------------------------
def test_registry_files_that_are_not_utf8_deep_or_not_files(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[sde.vp]\n# b\xe9ta\nbeta_min = 0.1\n".encode("latin-1"))
    deep = tmp_path / "deep.toml"
    deep.write_text("[sde.vp]\nx = " + "[" * 3000 + "]" * 3000 + "\n")
    deep17 = tmp_path / "deep17.toml"
    deep17.write_text("[sde.vp]\nx = " + "[" * 17 + "]" * 17 + "\n")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, needle in [
        (bad, "not UTF-8 text (byte 0xe9 at line 2); TOML files are UTF-8"),
        (deep, "arrays or tables nested too deeply"),
        (deep17, "deep17.toml: [sde.vp] x: nested deeper than 16 levels"),
        (fifo, "not a regular file"),
    ]:
        res = runner.invoke(build_app(), ["registry", "check", str(path)])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert needle in res.stderr, res.stderr
        with pytest.raises(RegistryError, match="nested|UTF-8|regular"):
            Engine(registry=path, autoload=False)


def test_deeply_nested_set_values(tmp_path):
    for depth in (20, 5000):
        value = "[" * depth + "]" * depth
        res = runner.invoke(build_app(), ["run", "-n", "8", "--set", f"snr={value}",
                                          "--out", str(tmp_path / "o")])  # fmt: skip
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "nested deeper than 16 levels" in res.stderr
