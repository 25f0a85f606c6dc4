"""Reading the user's data files for the ``file`` dataset, as untrusted input.

Every check happens before the data are allocated, and nothing ever blocks or runs code:

* only regular files are opened (``stat.S_ISREG``): a FIFO or a device would block the
  read forever or stream without end;
* ``.npy``: the header is read first (``numpy.lib.format``), never pickles
  (``allow_pickle=False``); its dtype must be a plain number (no structured, string,
  datetime, object or complex arrays), its shape must be ``(n, *dims)`` with every size
  >= 1, and the file must hold as many bytes as the header claims (a crafted header
  could otherwise ask for terabytes); the array is then mapped (``mmap_mode="r"``) and
  copied as float32 only once it is known to fit in memory. An ``.npz`` archive under an
  ``.npy`` name is recognised by its zip signature;
* ``.npz``: ``x`` (and optional integer ``labels``), each member's unpacked size read
  from the zip directory and checked against memory before it is decompressed;
* ``.pt``: ``torch.load(weights_only=True)`` (no code), a single dense (strided) tensor
  on a real device: sparse, quantised and meta tensors are refused;
* image folders: each image's size is read from its header before decoding, and images
  above Pillow's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: a small file that
  decodes to gigapixels) or a folder that would not fit in memory are refused.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch

from diffuse_engine import DiffuseError
from diffuse_engine.core.memory import FLOAT32, check_fits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
ZIP_MAGIC = b"PK\x03\x04"


def regular_file(p: Path, what: str = "data file") -> int:
    """The size of ``p`` if it is a regular file (never opens it); else a one-line error."""
    try:
        st = os.stat(p)
    except OSError as exc:
        raise DiffuseError(f"{what} {p}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DiffuseError(
            f"{what} {p}: not a regular file (a FIFO, socket or device would block or "
            "never end); give a .npy/.pt file or an image folder"
        )
    if st.st_size == 0:
        raise DiffuseError(f"{what} {p}: the file is empty (0 bytes)")
    return st.st_size


def check_shape(p: Path, shape: tuple[int, ...]) -> None:
    """``(n, *dims)`` with ``n >= 1`` and every dimension >= 1."""
    if len(shape) < 2 or min(shape) < 1:
        raise DiffuseError(
            f"data {p}: expected a (n, *dims) array with n >= 1 and every dimension >= 1, "
            f"got shape {tuple(shape)}"
        )


def _fits(p: Path, shape: tuple[int, ...]) -> None:
    check_fits(
        math.prod(shape) * FLOAT32,
        "cpu",
        f"data {p} (shape {tuple(shape)} as float32)",
        "use a smaller file or a subset of it",
    )


def checked_header(
    f, size: int, p: Path, what: str = "", data_shape: bool = True
) -> tuple[tuple[int, ...], np.dtype]:
    """Read an ``.npy`` header from the open binary file ``f`` (an array of ``size`` bytes
    in all) and check it before anything is allocated: a real-number dtype, a sane shape,
    and no more data claimed than the bytes that follow the header."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
        offset = f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise DiffuseError(
            f"data file {p}: {what}cannot read as .npy ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]})"
        ) from None
    check_dtype(p, dtype, what)
    if data_shape:  # a data array (n, *dims); labels are (n,) and checked once loaded
        check_shape(p, tuple(shape))
    need = math.prod(shape) * dtype.itemsize
    if size - offset < need:
        raise DiffuseError(
            f"data file {p}: {what}header claims shape {tuple(shape)} ({need:,} bytes) but "
            f"only {size - offset:,} bytes of data follow; it is truncated or crafted"
        )
    return tuple(shape), dtype


def read_npy(p: Path) -> torch.Tensor:
    """A ``.npy`` array as a float32 tensor (see the module doc for what is checked)."""
    size = regular_file(p)
    try:
        with open(p, "rb") as f:
            if f.read(6).startswith(ZIP_MAGIC):
                raise DiffuseError(
                    f"data file {p}: is a .npz (zip) archive, not an .npy array; save one "
                    "array with numpy.save, or rename it .npz and extract the array"
                )
            f.seek(0)
            shape, _ = checked_header(f, size, p)
    except OSError as exc:
        raise DiffuseError(f"data file {p}: cannot read as .npy ({exc})") from None
    _fits(p, shape)
    try:
        mapped = np.load(p, mmap_mode="r", allow_pickle=False)
        return torch.from_numpy(np.array(mapped, dtype=np.float32))
    except (OSError, ValueError) as exc:
        raise DiffuseError(f"data file {p}: cannot read as .npy ({exc})") from None


def check_dtype(p: Path, dtype: np.dtype, what: str = "") -> None:
    """A plain real number dtype (no structured, string, datetime, object, complex, bool)."""
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "iuf":
        kind = (
            "structured"
            if dtype.fields is not None
            else {
                "U": "string",
                "S": "bytes",
                "M": "datetime",
                "m": "timedelta",
                "O": "object (pickled)",
                "c": "complex",
                "V": "raw bytes",
                "b": "boolean",
            }.get(dtype.kind, dtype.kind)
        )
        raise DiffuseError(
            f"data file {p}: {what}holds {kind} values (dtype {dtype}); expected real numbers "
            "(float or integer)"
        )


def read_npz(p: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` and optional integer ``labels`` (one per row) of a numpy ``.npz``; each
    member's uncompressed size is read from the zip directory and checked against
    memory before it is decompressed (a small archive can inflate to terabytes)."""
    import zipfile

    regular_file(p)
    try:
        with zipfile.ZipFile(p) as zf:
            infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
            sizes = {k: i.file_size for k, i in infos.items()}
            for key in ("x", "labels"):  # each member's own header, before np.load
                if key in infos:
                    with zf.open(infos[key]) as member:
                        checked_header(member, infos[key].file_size, p, f"{key!r} ", key == "x")
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DiffuseError(f"data file {p}: cannot read as .npz ({exc})") from None
    if "x" not in sizes:
        raise DiffuseError(
            f"data file {p}: no array 'x' (has {', '.join(sizes) or 'none'}); an .npz "
            "holds the data as 'x' and optional integer class labels as 'labels'"
        )
    check_fits(
        sum(sizes.get(k, 0) for k in ("x", "labels")) * 2,
        "cpu",
        f"data {p} (its arrays unpacked)",
        "use a smaller file or a subset of it",
    )
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x", "labels") if k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DiffuseError(f"data file {p}: cannot read as .npz ({exc})") from None
    x_np = arrays["x"]
    check_dtype(p, x_np.dtype, "'x' ")
    check_shape(p, tuple(x_np.shape))
    labels = None
    if "labels" in arrays:
        y = arrays["labels"]
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x_np):
            raise DiffuseError(
                f"data file {p}: 'labels' must be one integer per row of 'x' "
                f"({len(x_np)}), got {y.dtype} of shape {y.shape}"
            )
        if len(y) and y.min() < 0:
            raise DiffuseError(f"data file {p}: 'labels' are negative; use 0 .. K - 1")
        labels = torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.asarray(x_np, dtype=np.float32)), labels


def read_pt(p: Path) -> torch.Tensor:
    """A ``.pt`` file holding one dense tensor, loaded without running code."""
    regular_file(p)
    try:
        x = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files
        raise DiffuseError(
            f"data file {p}: cannot read as a tensor .pt file ({type(exc).__name__})"
        ) from None
    if not isinstance(x, torch.Tensor):
        raise DiffuseError(f"data file {p}: holds a {type(x).__name__}; expected a single tensor")
    if x.layout != torch.strided or x.is_quantized:
        raise DiffuseError(
            f"data file {p}: holds a {x.layout} tensor; expected a dense one (sparse: "
            "save x.to_dense())"
        )
    if x.device.type == "meta":
        raise DiffuseError(f"data file {p}: holds a meta tensor (shapes only, no values)")
    if x.is_complex() or x.dtype == torch.bool:
        raise DiffuseError(f"data file {p}: holds a {x.dtype} tensor; expected real numbers")
    check_shape(p, tuple(x.shape))
    return x


def read_images(folder: Path, channels: int) -> torch.Tensor:
    """A folder of equally sized images as ``(n, C, H, W)`` in [-1, 1]."""
    from PIL import Image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DiffuseError(f"data folder {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    mode = "L" if channels == 1 else "RGB"
    limit = Image.MAX_IMAGE_PIXELS
    arrays: list[np.ndarray] = []
    for f in files:
        regular_file(f, "image")
        try:
            with warnings.catch_warnings():  # we refuse bombs ourselves, in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f)  # reads the header only
            with im:
                w, h = im.size
                if limit is not None and w * h > limit:
                    raise DiffuseError(
                        f"data folder {folder}: {f.name} is {w}x{h} = {w * h:,} pixels, over "
                        f"Pillow's MAX_IMAGE_PIXELS ({limit:,}): a decompression bomb?"
                    )
                if not arrays:
                    _fits(folder, (len(files), channels, h, w))
                arrays.append(np.asarray(im.convert(mode), dtype=np.float32))
        except DiffuseError:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own check, above 2x the limit
            raise DiffuseError(
                f"data folder {folder}: {f.name}: {str(exc).rstrip('.')}; refused (Pillow's "
                f"MAX_IMAGE_PIXELS is {limit:,})"
            ) from None
        except (OSError, ValueError) as exc:
            raise DiffuseError(f"data folder {folder}: cannot read {f.name} ({exc})") from None
        if arrays[-1].shape != arrays[0].shape:
            raise DiffuseError(
                f"data folder {folder}: {f.name} is {arrays[-1].shape[:2]}, "
                f"{files[0].name} is {arrays[0].shape[:2]}; all images must have one size"
            )
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
