"""Read PyTorch `.pth` state dicts with the standard library and NumPy, without PyTorch.

`torch.save` writes one of two layouts:

- since PyTorch 1.6, a zip archive: `<name>/data.pkl` holds the pickled object, in which each
  tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
  each storage a *persistent id* `("storage", torch.FloatStorage, key, location, numel)`;
  `<name>/data/<key>` holds that storage's raw bytes, in the byte order of `<name>/byteorder`
  (little-endian when absent);
- before it (and with `_use_new_zipfile_serialization=False`), the *legacy* layout: five
  pickles back to back (a magic number, the protocol version 1001, a dict of system facts, the
  object, the sorted list of storage keys), then each storage as an 8-byte little-endian element
  count followed by its raw bytes, in the order of that list. Cadene's
  `bn_inception-52deb4733.pth` (2017, Python 2) has this layout.

Unpickling runs code named by the file, so a `.pth` from the internet is an arbitrary-code
risk with `pickle.load` (and with `torch.load(weights_only=False)`). This reader's unpickler
resolves only the handful of names a state dict uses (an OrderedDict, the tensor-rebuild
functions, the storage types) to local NumPy-building functions, and refuses every other name,
before anything from the file is executed.

```python
from models.pytorch_checkpoint import read_state_dict

state = read_state_dict("bn_inception-52deb4733.pth")  # {name: numpy array}
state["conv1_7x7_s2.weight"].shape  # (64, 3, 7, 7)
```
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 when the tensor is built
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in the pickle: only its element type matters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage whose bytes are read after (legacy) or beside (zip) the pickle."""

    def __init__(self, key: str, storage_type: _StorageType, numel: int) -> None:
        self.key = key
        self.storage_type = storage_type
        self.numel = int(numel)
        self.data: np.ndarray | None = None
        self.view_of: tuple[_Storage, int] | None = None

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            root, offset = self.view_of
            return root.array()[offset : offset + self.numel]
        if self.data is None:
            raise ValueError(f"storage {self.key!r} has no data: the file is truncated")
        return self.data


class _TensorReference:
    """A tensor to build once its storage's bytes are known."""

    def __init__(self, storage: Any, offset: int, size: Any, stride: Any) -> None:
        if not isinstance(storage, _Storage):
            raise ValueError("a tensor refers to something that is not a storage")
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        data = self.storage.array()
        dtype = self.storage.storage_type.dtype
        if len(self.size) != len(self.stride) or any(s < 0 for s in self.size + self.stride):
            raise ValueError(f"tensor of size {self.size} has invalid strides {self.stride}")
        if 0 in self.size:
            return np.zeros(self.size, dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or last >= data.size:
            # as_strided would read outside the buffer: refuse rather than return garbage.
            raise ValueError(
                f"tensor of size {self.size} reaches element {last} of a storage of "
                f"{data.size}: the file is corrupt"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride),
            writeable=False,
        )
        array = np.array(view)  # a copy, in native byte order below
        if self.storage.storage_type.name == "BFloat16Storage":
            return (array.astype("<u4") << 16).view("<f4").astype(np.float32)
        return array.astype(array.dtype.newbyteorder("="))


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorReference(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles written by Python 3 spell `bytes` objects as _codecs.encode(str, enc).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call in a state dict")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
}


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that knows state dicts and refuses everything else."""

    def __init__(self, stream: BinaryIO, storages: dict[str, _Storage]) -> None:
        # Python 2 pickles hold keys as byte strings; PyTorch itself reads them as UTF-8.
        super().__init__(stream, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise pickle.UnpicklingError(f"unsupported tensor type torch.{name}")
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a state dict holds only tensors, and loading "
            "other objects would run code from the file. Save model.state_dict() instead of the "
            "model."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        view_metadata = pid[5] if len(pid) > 5 else None
        if view_metadata is not None:  # legacy layout: a view into a larger storage
            view_key, offset, view_size = view_metadata
            view = self.storages.get(str(view_key))
            if view is None:
                view = _Storage(str(view_key), storage_type, view_size)
                view.view_of = (storage, int(offset))
                self.storages[str(view_key)] = view
            return view
        return storage


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict, as NumPy arrays, in the file's order.

    A checkpoint that wraps the state dict (`{"state_dict": {...}, "epoch": ...}`) is unwrapped.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a PyTorch state dict, is truncated or corrupt, or holds
            pickled objects other than tensors (which this reader never executes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch file {path!r} does not exist")
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path)
        else:
            with open(path, "rb") as stream:
                obj = _read_legacy(stream, path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path!r} is not a readable PyTorch state dict: {error}") from None
    return _tensors(obj, path)


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path!r} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
        storages: dict[str, _Storage] = {}
        unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), storages)
        obj = unpickler.load()
        for key, storage in storages.items():
            if storage.view_of is not None:
                continue
            raw = archive.read(f"{prefix}data/{key}")
            dtype = storage.storage_type.dtype
            if byteorder == "big":
                dtype = dtype.newbyteorder(">")
            if len(raw) < storage.numel * dtype.itemsize:
                raise ValueError(f"storage {key!r} is truncated")
            storage.data = np.frombuffer(raw, dtype=dtype, count=storage.numel)
    return obj


def _read_legacy(stream: BinaryIO, path: str) -> Any:
    def load_plain() -> Any:
        return _StateDictUnpickler(stream, {}).load()

    try:
        magic = load_plain()
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path!r} is not a PyTorch file: {error}") from None
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path!r} is not a PyTorch file (wrong magic number)")
    protocol = load_plain()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path!r} has unsupported PyTorch protocol version {protocol!r}")
    system = load_plain()
    little_endian = system.get("little_endian", True) if isinstance(system, Mapping) else True
    storages: dict[str, _Storage] = {}
    obj = _StateDictUnpickler(stream, storages).load()
    keys = load_plain()
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise ValueError(f"storage {key!r} is listed but not used")
        header = stream.read(8)
        if len(header) != 8:
            raise ValueError(f"{path!r} is truncated (storage {key!r} missing)")
        numel = int.from_bytes(header, "little" if little_endian else "big")
        dtype = storage.storage_type.dtype
        if not little_endian:
            dtype = dtype.newbyteorder(">")
        raw = stream.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError(f"{path!r} is truncated (storage {key!r} is incomplete)")
        storage.data = np.frombuffer(raw, dtype=dtype)
        storage.numel = numel
    return obj


def _tensors(obj: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and not any(isinstance(v, _TensorReference) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                return _tensors(obj[key], path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, _TensorReference):
            tensors[str(name)] = value.materialize()
    if not tensors:
        raise ValueError(f"{path!r} holds no tensors")
    return tensors
