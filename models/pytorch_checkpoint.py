"""Read PyTorch `.pth` state dicts with the standard library and NumPy, without PyTorch.

`torch.save` writes one of two layouts:

- since PyTorch 1.6, a zip archive: `<name>/data.pkl` holds the pickled object, in which each
  tensor is a call to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and
  each storage a *persistent id* `("storage", torch.FloatStorage, key, location, numel)`;
  `<name>/data/<key>` holds that storage's raw bytes, uncompressed, in the byte order of
  `<name>/byteorder` (little-endian when absent);
- before it (and with `_use_new_zipfile_serialization=False`), the *legacy* layout: five
  pickles back to back (a magic number, the protocol version 1001, a dict of system facts, the
  object, the sorted list of storage keys), then each storage as an 8-byte element count
  followed by its raw bytes, in the order of that list. Cadene's `bn_inception-52deb4733.pth`
  (2017, Python 2) has this layout.

A `.pth` file may come from anyone, so nothing in it is trusted:

- Unpickling runs code named by the file (`pickle.load`, `torch.load(weights_only=False)`).
  This reader's unpickler resolves only the handful of names a state dict uses (an
  OrderedDict, the tensor-rebuild functions, the storage types) to local NumPy-building
  stand-ins, refuses every other name before anything from the file is executed, and refuses
  to set attributes on what it builds (pickle's BUILD).
- Sizes are claims. Before anything is allocated, every storage's element count is checked
  against the bytes the file really holds for it, every tensor's shape, strides and offset
  against its storage (a tensor never has more elements than the storage it views: strides
  that repeat elements would let 500 bytes claim gigabytes), and the total against
  `MAX_STATE_DICT_BYTES`. Zip entries are streamed, never inflated past what they declare.
- Structure is checked as it is read (types, counts, depth), so a malformed file is one
  `ValueError` naming it, never a `TypeError` or `RecursionError`.

```python
from models.pytorch_checkpoint import read_state_dict

state = read_state_dict("bn_inception-52deb4733.pth")  # {name: numpy array}
state["conv1_7x7_s2.weight"].shape  # (64, 3, 7, 7)
```
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: The most memory a state dict's arrays may take (its storages plus the tensors built from
#: them): 4 GiB, ten times ResNet-152 (240 MB in float32) and more than any convolutional
#: network bnzoo converts. A file that declares more is refused before anything is allocated;
#: pass `max_bytes` to `read_state_dict` for a larger model you trust.
MAX_STATE_DICT_BYTES = 4 * 2**30
#: The largest `data.pkl` read from a zip layout: 64 MiB. It holds names and shapes only (about
#: 150 bytes per tensor, 50 kB for BN-Inception), never the tensors' values.
MAX_PICKLE_BYTES = 64 * 2**20
#: How far an entry of a zip layout may inflate. `torch.save` stores every entry uncompressed
#: (ratio 1); weights deflate to ~90 % of their size, and only long runs of equal bytes reach
#: deflate's ~1000:1, which is what a zip bomb is made of. Entries under `SMALL_ENTRY_BYTES`
#: (a zero-initialized buffer) may inflate as they like.
MAX_COMPRESSION_RATIO = 32
SMALL_ENTRY_BYTES = 2**20
#: How many checkpoint wrappers (`{"state_dict": {...}, "epoch": ...}`) are unwrapped.
MAX_WRAPPING_DEPTH = 4
#: Dimensions of a tensor: NumPy's limit.
MAX_DIMENSIONS = 64
#: The keys under which checkpoints wrap their state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")

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


class _Refused(ValueError):
    """Why the file is not a readable state dict; `read_state_dict` adds the file's name."""


def _refuse_state(self: Any, state: Any) -> None:
    # pickle's BUILD sets attributes from the file: on these objects it could rewrite a
    # storage's size or a tensor's shape after they were checked.
    raise pickle.UnpicklingError(f"refusing to set the state of a {type(self).__name__}")


def _integer(value: Any, what: str, *, limit: int = 2**63 - 1) -> int:
    """`value` if it is an int in [0, limit] (bool and float are not)."""
    if type(value) is not int or not 0 <= value <= limit:
        shown = value if type(value) is int else type(value).__name__
        raise _Refused(f"{what} must be an integer in [0, {limit}], not {shown}")
    return value


def _integers(value: Any, what: str) -> tuple[int, ...]:
    if type(value) not in (tuple, list) or len(value) > MAX_DIMENSIONS:
        shown = f"{len(value)} values" if type(value) in (tuple, list) else type(value).__name__
        raise _Refused(f"{what} must be a tuple of at most {MAX_DIMENSIONS} integers, not {shown}")
    return tuple(_integer(item, what) for item in value)


class _Budget:
    """Bytes the arrays of one file may still take."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.spent = 0

    def spend(self, count: int, what: str) -> None:
        if self.spent + count > self.max_bytes:
            raise _Refused(
                f"{what} would take {count:,} bytes, {self.spent + count:,} in all: more than "
                f"the {self.max_bytes:,} bytes a state dict may take here (max_bytes); a crafted "
                "or corrupt file, or a model far larger than the ones bnzoo converts"
            )
        self.spent += count


class _StorageType:
    """Stands for `torch.FloatStorage` & co. in the pickle: only its element type matters."""

    __setstate__ = _refuse_state

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage whose bytes are read after (legacy) or beside (zip) the pickle, or (legacy)
    a view of `numel` elements at `offset` into a root storage."""

    __setstate__ = _refuse_state

    def __init__(
        self, key: str, storage_type: _StorageType, numel: int, view_of: _Storage | None = None
    ) -> None:
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self.data: np.ndarray | None = None
        self.view_of = view_of
        self.offset = 0

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            root = self.view_of.array()
            if self.offset + self.numel > root.size:
                raise _Refused(
                    f"storage {self.key!r} views elements {self.offset:,} to "
                    f"{self.offset + self.numel:,} of a storage of {root.size:,}: corrupt"
                )
            return root[self.offset : self.offset + self.numel]
        if self.data is None:
            raise _Refused(f"storage {self.key!r} has no data: the file is truncated")
        return self.data


class _TensorReference:
    """A tensor to build once its storage's bytes are known."""

    __setstate__ = _refuse_state

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        if not isinstance(storage, _Storage):
            raise _Refused("a tensor refers to something that is not a storage")
        self.storage = storage
        self.offset = _integer(offset, "a tensor's storage offset")
        self.size = _integers(size, "a tensor's size")
        self.stride = _integers(stride, "a tensor's stride")
        if len(self.size) != len(self.stride):
            raise _Refused(f"a tensor of size {self.size} has strides {self.stride}")
        self.array: np.ndarray | None = None

    def materialize(self, name: str, budget: _Budget) -> np.ndarray:
        """The tensor as a native-order NumPy array (float32 for bfloat16), built once."""
        if self.array is None:
            self.array = self._build(name, budget)
        return self.array

    def _build(self, name: str, budget: _Budget) -> np.ndarray:
        storage_type = self.storage.storage_type
        bfloat16 = storage_type.name == "BFloat16Storage"
        dtype = np.dtype(np.float32) if bfloat16 else storage_type.dtype.newbyteorder("=")
        data = self.storage.array()
        count = math.prod(self.size)
        if count > data.size or (count == 0 and max(self.size, default=0) > budget.max_bytes):
            raise _Refused(
                f"tensor {name!r} has {count:,} elements (size {self.size}, strides "
                f"{self.stride}) but its storage holds {data.size:,}: strides that repeat "
                "elements, which no state dict needs and a crafted file uses to claim memory "
                "it does not hold"
            )
        budget.spend(count * dtype.itemsize, f"tensor {name!r} of size {self.size}")
        if count == 0:
            return np.zeros(self.size, dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= data.size:
            # as_strided would read outside the buffer: refuse rather than return garbage.
            raise _Refused(
                f"tensor {name!r} of size {self.size} reaches element {last:,} of a storage of "
                f"{data.size:,}: the file is corrupt"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            # A dimension of size 1 is never stepped over: its stride may be anything.
            strides=tuple(
                s * data.itemsize if n > 1 else 0
                for n, s in zip(self.size, self.stride, strict=True)
            ),
            writeable=False,
        )
        if bfloat16:  # bfloat16 is the top half of a float32
            widened = np.array(view, dtype=np.uint32)
            widened <<= 16
            return widened.view(np.float32)
        return np.array(view, dtype=dtype)  # one copy, in native byte order


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorReference(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *_ignored):
    return data


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles written by Python 3 spell `bytes` objects as _codecs.encode(str, enc).
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call in a state dict")
    return text.encode("latin1")


class _StateDict(collections.OrderedDict):
    """`collections.OrderedDict` as a state dict unpickles it."""

    def __setstate__(self, state: Any) -> None:
        # PyTorch pickles a state dict's `_metadata` (module versions) as the dict's state;
        # nothing here needs it, and attributes from a file could shadow dict methods.
        pass


class _Allowed:
    """A function a state dict's pickle may call; pickle's BUILD cannot change it."""

    __setstate__ = _refuse_state

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Allowed(_StateDict),
    ("torch._utils", "_rebuild_tensor"): _Allowed(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Allowed(_rebuild_parameter),
    ("_codecs", "encode"): _Allowed(_codecs_encode),
    ("builtins", "set"): _Allowed(set),
    ("__builtin__", "set"): _Allowed(set),
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
        if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(
                f"unsupported persistent id (a {type(pid).__name__}, not a storage)"
            )
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {type(storage_type).__name__}")
        if type(key) is not str:
            raise _Refused(f"a storage key must be a string, not {type(key).__name__}")
        numel = _integer(numel, f"the element count of storage {key!r}")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        if storage.storage_type.name != storage_type.name:
            raise _Refused(
                f"storage {key!r} is both {storage.storage_type.name} and {storage_type.name}"
            )
        view_metadata = pid[5] if len(pid) > 5 else None
        if view_metadata is None:
            return storage
        # Legacy layout: a view of `view_size` elements at `offset` into the root storage.
        if type(view_metadata) is not tuple or len(view_metadata) != 3:
            raise _Refused("a storage view must be (key, offset, size)")
        view_key, offset, view_size = view_metadata
        if type(view_key) is not str:
            raise _Refused(f"a storage view's key must be a string, not {type(view_key).__name__}")
        offset = _integer(offset, f"the offset of storage view {view_key!r}")
        view_size = _integer(view_size, f"the size of storage view {view_key!r}")
        view = self.storages.get(view_key)
        if view is None:
            # A view of a view is a view of the root: no chain for `array` to walk.
            while storage.view_of is not None:
                offset, storage = offset + storage.offset, storage.view_of
            view = _Storage(view_key, storage_type, view_size, view_of=storage)
            view.offset = offset
            self.storages[view_key] = view
        if view.storage_type.name != storage_type.name:
            raise _Refused(
                f"storage {view_key!r} is both {view.storage_type.name} and {storage_type.name}"
            )
        return view


def read_state_dict(
    path: str | os.PathLike, *, max_bytes: int = MAX_STATE_DICT_BYTES
) -> dict[str, np.ndarray]:
    """The tensors of a `torch.save`d state dict, as NumPy arrays, in the file's order.

    A checkpoint that wraps the state dict (`{"state_dict": {...}, "epoch": ...}`) is unwrapped.
    Nothing from the file is executed and nothing is allocated before its size has been
    checked against the file's real content and `max_bytes` (see the module docstring).

    Args:
        path: a `.pth` file in either of `torch.save`'s layouts.
        max_bytes: the most memory the arrays may take, storages and tensors together.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a PyTorch state dict, is truncated or corrupt, holds
            pickled objects other than tensors (which this reader never executes), or declares
            more than `max_bytes` of tensors; the message names the file and the reason.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file, so not a PyTorch state dict")
    budget = _Budget(max_bytes)
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path, budget)
        else:
            with open(path, "rb") as stream:
                obj = _read_legacy(stream, budget)
        return _tensors(obj, budget)
    except (
        # What the unpickler and zipfile raise for malformed input (TypeError: an object that
        # cannot be a dict key, a call of something that is not callable; RuntimeError: an
        # encrypted entry; NotImplementedError: an unknown compression method).
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        OverflowError,
        UnicodeDecodeError,
        struct.error,
        RuntimeError,
        NotImplementedError,
        ValueError,
    ) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{path!r} is not a readable PyTorch state dict: {reason}") from None


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int, what: str) -> bytes:
    """The entry `name`, streamed; refused when it declares more than `limit` bytes or inflates
    like a zip bomb, and never inflated past `limit`."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _Refused(f"{what} is missing (no {name!r} in the archive)") from None
    if (
        info.compress_type != zipfile.ZIP_STORED
        and info.file_size > SMALL_ENTRY_BYTES
        and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size
    ):
        raise _Refused(
            f"{what} ({name!r}) inflates {info.compress_size:,} bytes to {info.file_size:,}: a "
            "zip bomb, not a file torch.save wrote (it stores entries uncompressed)"
        )
    if info.file_size > limit:
        raise _Refused(f"{what} ({name!r}) declares {info.file_size:,} bytes, more than {limit:,}")
    with archive.open(info) as entry:
        return entry.read(limit)


def _read_zip(path: str, budget: _Budget) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise _Refused("a zip file but not a PyTorch checkpoint (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            raw = _read_entry(archive, f"{prefix}byteorder", 16, "the byte order")
            byteorder = raw.decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise _Refused(f"unknown byte order {byteorder[:16]!r}")
        storages: dict[str, _Storage] = {}
        data = _read_entry(archive, pickles[0], MAX_PICKLE_BYTES, "the pickle")
        obj = _StateDictUnpickler(io.BytesIO(data), storages).load()
        roots = [storage for storage in storages.values() if storage.view_of is None]
        # Every claim is checked before any storage is read.
        for storage in roots:
            budget.spend(
                storage.numel * storage.storage_type.dtype.itemsize, f"storage {storage.key!r}"
            )
        for storage in roots:
            dtype = storage.storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
            expected = storage.numel * dtype.itemsize
            name = f"{prefix}data/{storage.key}"
            raw = _read_entry(archive, name, expected, f"storage {storage.key!r}")
            if len(raw) != expected:
                raise _Refused(
                    f"storage {storage.key!r} is truncated ({len(raw):,} of {expected:,} bytes)"
                )
            storage.data = np.frombuffer(raw, dtype=dtype)
    return obj


def _read_legacy(stream: BinaryIO, budget: _Budget) -> Any:
    def load_plain() -> Any:
        return _StateDictUnpickler(stream, {}).load()

    file_size = os.fstat(stream.fileno()).st_size
    try:
        magic = load_plain()
    except pickle.UnpicklingError as error:
        raise _Refused(f"not a PyTorch file: {error}") from None
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise _Refused("not a PyTorch file (wrong magic number)")
    protocol = load_plain()
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL_VERSION:
        raise _Refused("unsupported PyTorch protocol version")
    system = load_plain()
    little_endian = system.get("little_endian", True) if isinstance(system, Mapping) else True
    storages: dict[str, _Storage] = {}
    obj = _StateDictUnpickler(stream, storages).load()
    keys = load_plain()
    if type(keys) is not list or not all(type(key) is str for key in keys):
        raise _Refused("the list of storage keys is not a list of strings")
    if len(set(keys)) != len(keys):
        raise _Refused("a storage is listed twice")
    for key in keys:
        storage = storages.get(key)
        if storage is None or storage.view_of is not None:
            raise _Refused(f"storage {key!r} is listed but not used")
        budget.spend(storage.numel * storage.storage_type.dtype.itemsize, f"storage {key!r}")
    for key in keys:
        storage = storages[key]
        header = stream.read(8)
        if len(header) != 8:
            raise _Refused(f"the file is truncated (storage {key!r} missing)")
        numel = int.from_bytes(header, "little" if little_endian else "big")
        if numel != storage.numel:
            raise _Refused(
                f"storage {key!r} declares {numel:,} elements where the pickle said "
                f"{storage.numel:,}: the file is corrupt"
            )
        dtype = storage.storage_type.dtype
        if not little_endian:
            dtype = dtype.newbyteorder(">")
        expected = numel * dtype.itemsize
        if expected > file_size - stream.tell():
            raise _Refused(f"the file is truncated (storage {key!r} is incomplete)")
        raw = stream.read(expected)
        if len(raw) != expected:
            raise _Refused(f"the file is truncated (storage {key!r} is incomplete)")
        storage.data = np.frombuffer(raw, dtype=dtype)
    return obj


def _holds_tensors(obj: Mapping) -> bool:
    return any(isinstance(value, _TensorReference) for value in obj.values())


def _tensors(obj: Any, budget: _Budget) -> dict[str, np.ndarray]:
    for _ in range(MAX_WRAPPING_DEPTH + 1):
        if not isinstance(obj, Mapping):
            raise _Refused(f"it holds a {type(obj).__name__}, not a state dict")
        if _holds_tensors(obj):
            break
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = inner
    else:
        raise _Refused(f"no state dict within {MAX_WRAPPING_DEPTH} levels of wrapping")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorReference):
            continue
        if type(name) is not str:
            raise _Refused(f"a tensor's name must be a string, not {type(name).__name__}")
        tensors[name] = value.materialize(name, budget)
    if not tensors:
        raise _Refused("it holds no tensors")
    return tensors
