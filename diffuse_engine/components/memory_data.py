"""In-memory training data: what an application already holds, as a :class:`Dataset`.

``Engine.train(data=X, labels=y)`` wraps ``X`` in :class:`MemoryData`. Accepted:

* a ``torch.Tensor`` or a NumPy array ``(n, *dims)``;
* a ``torch.utils.data.Dataset`` (map-style or iterable) whose items are ``x`` or
  ``(x, label)``;
* any other iterable of batches (a ``DataLoader``, a list, a generator), each a tensor /
  array ``(b, *dims)`` or a pair ``(x, labels)``; it is read once, up front.

Labels (``labels=y``, or the second element of items / batches) are integers
``0 .. K - 1`` with ``K = max + 1``. Everything is validated once with the same one-line
errors the ``file`` dataset gives, converted to float32 on the CPU and held; ``sample``
draws rows with replacement like every finite dataset. A checkpoint records only what
the data looked like (:meth:`MemoryData.record`: type ``memory``, shape, dtype, rows,
classes), never the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffuse_engine.components.data import Dataset
from diffuse_engine.core.errors import DiffuseError

#: the ``type`` an in-memory dataset records (no implementation of that name is built)
MEMORY_TYPE = "memory"


def _as_tensor(v: Any, what: str) -> Tensor:
    if isinstance(v, Tensor):
        return v.detach().cpu()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's extras
        np = None
    if np is not None and isinstance(v, np.ndarray):
        if v.dtype == object or v.dtype.kind in "USV":
            raise DiffuseError(
                f"data: {what} is a NumPy array of {v.dtype}; expected numbers (n, *dims)"
            )
        return torch.from_numpy(np.ascontiguousarray(v))
    if isinstance(v, (int, float)):
        return torch.tensor(v)
    raise DiffuseError(f"data: {what} is a {type(v).__name__}; expected a tensor or NumPy array")


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 1:  # TensorDataset(x) gives (x,)
        return item[0], None
    if isinstance(item, (tuple, list)):
        raise DiffuseError(
            f"data: an item/batch is a {type(item).__name__} of {len(item)}; expected x "
            "or (x, label)"
        )
    return item, None


def _gather(data: Any) -> tuple[Tensor, Tensor | None, str]:
    """``(x, labels or None, source description)`` from any accepted form."""
    if isinstance(data, Tensor) or type(data).__module__ == "numpy":
        return _as_tensor(data, "the array"), None, type(data).__name__
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple, int, float)):
        try:  # nested lists of numbers: an array written out
            return torch.as_tensor(data), None, "nested list"
        except (TypeError, ValueError, RuntimeError):
            first = data[0]
            if isinstance(first, (int, float)) or all(
                isinstance(v, (int, float, list, tuple)) for v in first
            ):
                raise DiffuseError(
                    "data: nested lists of numbers must be rectangular, (n, *dims); "
                    "some rows differ in length"
                ) from None
            # else a list of (x, label) batches: read below
    if isinstance(data, (str, bytes, dict)):
        raise DiffuseError(
            f"data: a {type(data).__name__} is not in-memory data; give a tensor, NumPy "
            "array, torch Dataset or iterable of batches (a registry name is a str)"
        )
    is_items = isinstance(data, torch.utils.data.Dataset)
    if is_items and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items: Iterable[Any] = (data[i] for i in range(len(data)))
    elif isinstance(data, Iterable):
        items = data
    else:
        raise DiffuseError(
            f"data: a {type(data).__name__} is not in-memory data; give a tensor, NumPy "
            "array, torch Dataset (items x or (x, label)) or an iterable of batches"
        )
    xs, ys = [], []
    for k, item in enumerate(items):
        x, y = _split_item(item)
        x = _as_tensor(x, f"item {k}")
        if not is_items and x.dim() == 0:
            raise DiffuseError(f"data: batch {k} is a single number; batches are (b, *dims) arrays")
        xs.append(x[None] if is_items else x)
        if k == 0:
            labelled = y is not None
        elif (y is not None) != labelled:
            raise DiffuseError(
                f"data: item/batch {k} {'has' if y is not None else 'lacks'} labels and "
                "item/batch 0 does not; give labels for all or none"
            )
        if y is not None:
            y = _as_tensor(y, f"the labels of item {k}")
            ys.append(y.reshape(1) if is_items else y)
    if not xs:
        raise DiffuseError("data: the dataset / iterable is empty; expected n >= 1 points")
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise DiffuseError(
            f"data: items/batches have different shapes {sorted(shapes)[:3]}; all points "
            "must have one shape"
        )
    kind = "Dataset items" if is_items else "batches"
    return torch.cat(xs), (torch.cat(ys) if ys else None), f"{type(data).__name__} {kind}"


class MemoryData(Dataset):
    """Data held in memory (see the module doc); ``labels`` optional, ``(n,)`` ints."""

    name: ClassVar[str] = MEMORY_TYPE

    def __init__(self, data: Any, labels: Any = None):
        super().__init__(None)
        x, item_labels, self.source = _gather(data)
        if labels is not None and item_labels is not None:
            raise DiffuseError(
                "data: labels given twice (labels= and in the data's items); give one"
            )
        self.dtype = str(x.dtype).removeprefix("torch.")
        if x.dim() < 2 or x.shape[0] == 0 or x.is_complex() or x.dtype == torch.bool:
            raise DiffuseError(
                f"data: expected a (n, *dims) array with n >= 1, got shape {tuple(x.shape)}"
                + (f" of {self.dtype}" if x.is_complex() or x.dtype == torch.bool else "")
            )
        x = x.float()
        if not torch.isfinite(x).all():
            raise DiffuseError("data: contains NaN or Inf values")
        self.data = x.contiguous()
        self.labels = None
        y = labels if labels is not None else item_labels
        if y is not None:
            self.labels = self._check_labels(_as_tensor(y, "labels"), x.shape[0])
            self.num_classes = int(self.labels.max()) + 1

    @staticmethod
    def _check_labels(y: Tensor, n: int) -> Tensor:
        if y.dim() != 1 or y.shape[0] != n:
            raise DiffuseError(
                f"labels: expected shape ({n},) (one per data point), got {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            if not (y.is_floating_point() and torch.equal(y, y.round())):
                raise DiffuseError(f"labels: expected integer class labels, got {y.dtype}")
        y = y.long()
        if int(y.min()) < 0:
            raise DiffuseError(f"labels: class labels are 0 .. K - 1; got {int(y.min())}")
        return y

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one data point."""
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` rows drawn with replacement."""
        return self.data[torch.randint(0, len(self), (n,), generator=generator)]

    def sample_labelled(self, n: int, generator: torch.Generator | None = None):
        """``(x, labels)`` rows drawn with replacement (labelled data only)."""
        if self.labels is None:
            raise DiffuseError("data: these in-memory data have no labels; pass labels=")
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self.data[idx], self.labels[idx]

    def record(self) -> dict[str, Any]:
        """What a checkpoint records about the data: never the data themselves."""
        return {
            "name": MEMORY_TYPE,
            "type": MEMORY_TYPE,
            "shape": list(self.shape),
            "rows": len(self),
            "dtype": self.dtype,
            "source": self.source,
            "num_classes": self.num_classes,
        }

    def check_matches(self, rec: dict[str, Any], where: str) -> None:
        """Refuse to resume a run recorded on other data (shape, dtype or classes)."""
        mine = self.record()
        diff = [k for k in ("shape", "dtype", "num_classes") if rec.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise DiffuseError(
                f"{where} was trained on in-memory data with {k} {rec.get(k)!r}; these data "
                f"have {mine[k]!r}: resume with the same data"
            )


def is_memory_record(spec: Any) -> bool:
    """Whether a recorded ``data`` entry describes in-memory data."""
    return isinstance(spec, dict) and spec.get("type") == MEMORY_TYPE
