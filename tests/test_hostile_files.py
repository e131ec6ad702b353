"""Files from someone else: every loader refuses a crafted file in one line, in bounded memory
and time, and leaves nothing behind (issue 15 §3, §4; the trust model is docs/security.md).

The crafted files are built here, a few hundred bytes each: `.pth` pickles assembled opcode by
opcode (no PyTorch needed, and no object of ours is pickled, so the bytes are exactly what an
attacker would write), `.keras` archives with hand-written config.json, image folders with
device files and FIFOs. Where a user meets a file through a script, the script runs in a
subprocess and its exit status, its single stderr line, its peak memory (`os.wait4`) and what it
left on disk are checked.
"""

import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from models.pytorch_checkpoint import MAX_PICKLE_BYTES, read_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


# ------------------------------------------------------------------------------------------
# Helpers: a pickle assembler, and a subprocess runner that measures peak memory.
# ------------------------------------------------------------------------------------------


class Global:
    """A `GLOBAL module name` opcode: what an attacker's pickle names."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """`func(*args)` through pickle's REDUCE."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Persistent:
    """A persistent id (BINPERSID): how `torch.save` refers to a storage."""

    def __init__(self, pid):
        self.pid = pid


class Raw:
    """Opcodes written by hand (memo tricks, nesting too deep for a recursive assembler)."""

    def __init__(self, data):
        self.data = data


def opcodes(value) -> bytes:
    """Protocol-2 opcodes that push `value`."""
    if isinstance(value, Raw):
        return value.data
    if value is None:
        return b"N"
    if value is True or value is False:
        return b"\x88" if value else b"\x89"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"J" + struct.pack("<i", value)
        data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(data)]) + data
    if isinstance(value, float):
        return b"G" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(value, tuple):
        return b"(" + b"".join(map(opcodes, value)) + b"t"
    if isinstance(value, list):
        return b"]" + b"".join(opcodes(item) + b"a" for item in value)
    if isinstance(value, dict):
        return b"}" + b"".join(opcodes(k) + opcodes(v) + b"s" for k, v in value.items())
    if isinstance(value, Global):
        return f"c{value.module}\n{value.name}\n".encode()
    if isinstance(value, Call):
        return opcodes(value.func) + opcodes(tuple(value.args)) + b"R"
    if isinstance(value, Persistent):
        return opcodes(value.pid) + b"Q"
    raise TypeError(value)


def dumps(value) -> bytes:
    return b"\x80\x02" + opcodes(value) + b"."


FLOAT = Global("torch", "FloatStorage")
ORDERED_DICT = Call(Global("collections", "OrderedDict"))


def storage(key, numel, storage_type=FLOAT, view=None):
    pid = ("storage", storage_type, key, "cpu", numel) + ((view,) if view else ())
    return Persistent(pid)


def tensor(size, stride, *, key="0", numel=None, offset=0, storage_type=FLOAT, view=None):
    """`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""
    numel = numel if numel is not None else int(np.prod(size))
    return Call(
        Global("torch._utils", "_rebuild_tensor_v2"),
        storage(key, numel, storage_type, view),
        offset,
        size,
        stride,
        False,
        ORDERED_DICT,
    )


def zip_pth(path, obj, storages=(), *, compress=zipfile.ZIP_STORED, pickle_bytes=None):
    """`torch.save`'s zip layout: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "archive/data.pkl",
            pickle_bytes if pickle_bytes is not None else dumps(obj),
            compress_type=compress,
        )
        archive.writestr("archive/byteorder", "little")
        for key, data in dict(storages).items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compress)
    return path


def legacy_pth(path, obj, storages=()):
    """`torch.save`'s legacy layout: magic, protocol, system info, object, keys, storages."""
    with open(path, "wb") as stream:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            stream.write(pickle.dumps(header, protocol=2))
        stream.write(dumps(obj))
        stream.write(pickle.dumps([key for key, _, _ in storages], protocol=2))
        for _, numel, data in storages:
            stream.write(struct.pack("<Q", numel) + data)
    return path


def peak_traced_bytes(function, *args, **kwargs):
    """(the exception `function` raised, or its result; the peak bytes Python and NumPy
    allocated meanwhile). NumPy reports its buffers to tracemalloc."""
    tracemalloc.start()
    try:
        try:
            outcome = function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - returned for the test to check
            outcome = error
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class Measured:
    def __init__(self, returncode, stdout, stderr, peak_rss, seconds):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.peak_rss, self.seconds = peak_rss, seconds


#: Runs a command as its own child and writes the child's peak resident memory (KiB) to a file.
#: A process forked from pytest starts with pytest's resident pages counted as its own (over a
#: GiB late in the suite), so the command is forked from this small launcher instead; a signal
#: that ends the command ends the launcher the same way.
_LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    report.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv, *, cwd, timeout=300, env=None) -> Measured:
    """Run a command like a user, with its own peak resident memory (the rusage of a child of a
    small launcher, see `_LAUNCHER`) and wall time; killed after `timeout` seconds."""
    out_path, err_path = os.path.join(cwd, ".stdout"), os.path.join(cwd, ".stderr")
    rss_path = os.path.join(cwd, ".peak_rss")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, rss_path, *argv],
            cwd=cwd,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
            start_new_session=True,
        )
        timer = threading.Timer(timeout, lambda: os.killpg(process.pid, signal.SIGKILL))
        timer.start()
        try:
            process.wait()
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
    with open(out_path) as out, open(err_path) as err:
        stdout, stderr = out.read(), err.read()
    peak_kib = 0
    if os.path.exists(rss_path):
        with open(rss_path) as report:
            peak_kib = int(report.read() or 0)
    for path in (out_path, err_path, rss_path):
        if os.path.exists(path):
            os.remove(path)
    return Measured(process.returncode, stdout, stderr, peak_kib * 1024, seconds)


def one_error_line(result, status, prog):
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr[-3000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def train_py_error(tmp_path, *argv, timeout=180):
    """train.py `argv` for one epoch into `tmp_path/run`, measured: it must stop with one error
    line and exit status 1, leaving no run folder. Returns the line and the measured run."""
    output = tmp_path / "run"
    result = run_measured(
        [sys.executable, os.path.join(ROOT, "train.py"), *argv]
        + ["--output-dir", output, "--epochs", "1"],
        cwd=tmp_path,
        timeout=timeout,
    )
    line = one_error_line(result, 1, "train.py")
    assert not output.exists()
    return line, result


# ------------------------------------------------------------------------------------------
# 1. The .pth reader: sizes are claims, checked before anything is allocated.
# ------------------------------------------------------------------------------------------

ONE_FLOAT = {"0": b"\0\0\0\0"}


def test_strides_that_repeat_one_element_are_refused_before_allocating(tmp_path):
    # 4096 x 4096 views of one float: 64 MiB from a 500-byte file (the convert case,
    # 16384 x 16384, allocated 3 GB; see the subprocess test below).
    path = zip_pth(tmp_path / "x.pth", {"w": tensor((4096, 4096), (0, 0), numel=1)}, ONE_FLOAT)
    assert os.path.getsize(path) < 600
    error, peak = peak_traced_bytes(read_state_dict, path)
    assert isinstance(error, ValueError), error
    assert str(path) in str(error) and "16,777,216 elements" in str(error)
    assert "storage holds 1" in str(error)
    assert peak < MiB


def test_a_four_tebibyte_tensor_is_one_value_error_not_a_memory_error(tmp_path):
    path = zip_pth(tmp_path / "x.pth", {"w": tensor((2**20, 2**20), (0, 0), numel=1)}, ONE_FLOAT)
    error, peak = peak_traced_bytes(read_state_dict, path)
    assert type(error) is ValueError and "1,099,511,627,776 elements" in str(error)
    assert peak < MiB


@pytest.mark.parametrize("pickle_numel", [1, 2**61])
def test_a_legacy_storage_header_claiming_2_61_elements_is_refused(tmp_path, pickle_numel):
    obj = {"w": tensor((1,), (1,), numel=pickle_numel)}
    path = legacy_pth(tmp_path / "x.pth", obj, [("0", 2**61, b"\0\0\0\0")])
    error, peak = peak_traced_bytes(read_state_dict, path)
    assert type(error) is ValueError, error
    expected = "declares 2,305,843,009,213,693,952 elements" if pickle_numel == 1 else "max_bytes"
    assert expected in str(error) and str(path) in str(error)
    assert peak < MiB


def test_a_storage_entry_that_inflates_like_a_zip_bomb_is_not_inflated(tmp_path):
    # 64 MiB of zeros deflate to 64 kB: a storage of 16 Mi floats, declared honestly.
    bomb = bytes(64 * MiB)
    path = zip_pth(
        tmp_path / "x.pth",
        {"w": tensor((16 * MiB,), (1,))},
        {"0": bomb},
        compress=zipfile.ZIP_DEFLATED,
    )
    del bomb
    assert os.path.getsize(path) < 200_000
    error, peak = peak_traced_bytes(read_state_dict, path)
    assert type(error) is ValueError and "zip bomb" in str(error), error
    assert peak < 4 * MiB


def test_a_pickle_larger_than_any_state_dicts_is_not_read(tmp_path):
    path = zip_pth(
        tmp_path / "x.pth",
        None,
        pickle_bytes=b"\x80\x02N" + bytes(MAX_PICKLE_BYTES + MiB),
    )
    error, peak = peak_traced_bytes(read_state_dict, path)
    assert type(error) is ValueError and "more than 67,108,864" in str(error), error
    assert peak < 4 * MiB


def test_many_names_for_one_tensor_share_its_array_and_the_total_is_bounded(tmp_path):
    # One tensor under 1,000 names through pickle's memo: built once, not 1,000 times.
    memoized = Raw(opcodes(tensor((4096,), (1,))) + b"q\x00")
    entries = b"".join(opcodes(f"w{i}") + b"h\x00s" for i in range(1, 1000))
    shared = Raw(b"}" + opcodes("w0") + memoized.data + b"s" + entries)
    path = zip_pth(tmp_path / "shared.pth", None, {"0": bytes(16384)}, pickle_bytes=dumps(shared))
    state, peak = peak_traced_bytes(read_state_dict, path)
    assert len(state) == 1000 and state["w999"] is state["w0"]
    assert peak < MiB  # 1,000 copies would take 16 MiB
    # Distinct views of one storage each cost their size: 1,000 x 1 kB exceeds max_bytes=100 kB.
    distinct = {f"w{i}": tensor((256,), (1,)) for i in range(1000)}
    path = zip_pth(tmp_path / "distinct.pth", distinct, {"0": bytes(1024)})
    with pytest.raises(ValueError, match="max_bytes"):
        read_state_dict(path, max_bytes=100_000)


def deep_dicts(depth):
    return Raw(b"}" + (opcodes("state_dict") + b"}") * depth + b"s" * depth)


@pytest.mark.parametrize(
    ("name", "obj", "message"),
    [
        ("5000-deep", deep_dicts(5000), "no state dict within 4 levels"),
        ("self-referencing", Raw(b"}q\x00" + opcodes("state_dict") + b"h\x00s"), "4 levels"),
        ("None size", {"w": tensor(None, (1,), numel=1)}, "size must be a tuple"),
        ("float offset", {"w": tensor((1,), (1,), offset=0.5)}, "offset must be an integer"),
        ("bool stride", {"w": tensor((1,), (True,))}, "stride must be an integer"),
        ("set size", {"w": tensor(Call(Global("builtins", "set"), [1]), (1,), numel=1)}, "set"),
        ("set key", Raw(b"}" + opcodes(Call(Global("builtins", "set"), [1])) + b"Ns"), "set"),
        ("int name", Raw(b"}J\x05\x00\x00\x00" + opcodes(tensor((1,), (1,))) + b"s"), "name"),
        ("negative size", {"w": tensor((-1,), (1,), numel=1)}, "integer in"),
        ("size/stride ranks", {"w": tensor((1, 1), (1,))}, "has strides"),
        (
            "no storage",
            {"w": Call(Global("torch._utils", "_rebuild_tensor_v2"), 1, 0, (1,), (1,))},
            "not a storage",
        ),
        ("storage key", {"w": tensor((1,), (1,), key=("k",))}, "key must be a string"),
        ("a list", [1, 2], "holds a list"),
        ("a call of a storage type", Call(FLOAT, 1), "not callable"),
        (
            "BUILD on a tensor",
            Raw(opcodes(tensor((1,), (1,))) + opcodes({"size": 1}) + b"b"),
            "state",
        ),
        ("os.system", Call(Global("os", "system"), "true"), "refusing to load os.system"),
    ],
)
def test_malformed_structures_are_one_value_error_naming_the_file(tmp_path, name, obj, message):
    path = zip_pth(tmp_path / "x.pth", obj, ONE_FLOAT)
    with pytest.raises(ValueError, match="not a readable PyTorch state dict") as raised:
        read_state_dict(path)
    assert type(raised.value) is ValueError  # not a TypeError, RecursionError or MemoryError
    assert str(path) in str(raised.value) and message in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("view", "message"),
    [
        (5, "(key, offset, size)"),
        (("v", None, 1), "offset of storage view 'v'"),
        (("v", 0, "1"), "size of storage view 'v'"),
        ((1, 0, 1), "view's key must be a string"),
        (("v", 3, 2), "views elements 3 to 5 of a storage of 4"),
    ],
)
def test_malformed_legacy_views_are_one_value_error(tmp_path, view, message):
    obj = {"w": tensor((1,), (1,), numel=4, view=view)}
    path = legacy_pth(tmp_path / "x.pth", obj, [("0", 4, bytes(16))])
    with pytest.raises(ValueError) as raised:
        read_state_dict(path)
    assert type(raised.value) is ValueError and message in str(raised.value), str(raised.value)


def test_a_chain_of_5000_views_is_read_without_recursion(tmp_path):
    # Each view names the previous one as its root: resolved to the real root as it is read.
    views = [tensor((1,), (1,), key="0", numel=4, view=("v1", 1, 3))]
    views += [
        tensor((1,), (1,), key=f"v{i}", numel=1, view=(f"v{i + 1}", 0, 3)) for i in range(1, 5000)
    ]
    obj = Raw(b"}" + b"".join(opcodes(f"t{i}") + opcodes(v) + b"s" for i, v in enumerate(views)))
    data = np.arange(4, dtype="<f4").tobytes()
    path = legacy_pth(tmp_path / "x.pth", obj, [("0", 4, data)])
    state = read_state_dict(path)
    assert len(state) == 5000 and state["t4999"].tolist() == [1.0]


def test_pytorchs_state_dict_metadata_is_accepted_and_ignored(tmp_path):
    # A real `model.state_dict()` is an OrderedDict whose `_metadata` pickle sets with BUILD.
    state_dict = Raw(
        opcodes(ORDERED_DICT)
        + opcodes({"_metadata": {"": {"version": 1}}})
        + b"b"
        + opcodes("w")
        + opcodes(tensor((2,), (1,)))
        + b"s"
    )
    data = np.array([1.5, -2.0], "<f4").tobytes()
    state = read_state_dict(zip_pth(tmp_path / "x.pth", state_dict, {"0": data}))
    assert list(state) == ["w"] and state["w"].tolist() == [1.5, -2.0]


def test_bfloat16_big_endian_and_strided_tensors_read_as_numpy_would(tmp_path):
    values = np.array([[1.0, -2.5, 3.25], [0.5, 1e30, -1e-30]], np.float32)
    bfloat16 = (values.view("<u4") >> 16).astype("<u2")  # the top half of each float32
    obj = {
        "bf16": tensor((2, 3), (3, 1), storage_type=Global("torch", "BFloat16Storage")),
        "transposed": tensor((3, 2), (1, 3), key="1", numel=6),
        "offset": tensor((2,), (2,), key="1", numel=6, offset=1),
    }
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", dumps(obj))
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", bfloat16.astype(">u2").tobytes())
        archive.writestr("archive/data/1", values.astype(">f4").tobytes())
    state = read_state_dict(path)
    expected_bf16 = (bfloat16.astype("<u4") << 16).view("<f4")
    np.testing.assert_array_equal(state["bf16"], expected_bf16)
    assert state["bf16"].dtype == np.float32 and state["bf16"][0, 1] == -2.5
    np.testing.assert_array_equal(state["transposed"], values.T)
    np.testing.assert_array_equal(state["offset"], values.reshape(-1)[1:4:2])
    assert state["transposed"].dtype == np.dtype("=f4")


def test_convert_refuses_the_537_byte_memory_bomb_in_one_line_within_bounded_memory(tmp_path):
    # Before: `python -m models convert` allocated 3 GB (peak RSS 2.8 GiB) for this file, then
    # said "axes don't match array". A BN-Inception conversion that fails at once peaks at
    # ~0.8 GiB (TensorFlow and the model).
    bomb = {"conv1_7x7_s2.weight": tensor((16384, 16384), (0, 0), numel=1)}
    work = tmp_path / "work"
    work.mkdir()
    source = zip_pth(work / "bn_inception-52deb4733.pth", bomb, ONE_FLOAT)
    assert os.path.getsize(source) < 600
    destination = work / "out" / "bn_inception.weights.h5"
    result = run_measured(
        [sys.executable, "-m", "models", "convert", "bn_inception", source, destination],
        cwd=work,
        env={"KERAS_HOME": str(tmp_path / "keras")},
    )
    line = one_error_line(result, 1, "python -m models")
    assert str(source) in line and "268,435,456 elements" in line
    assert sorted(os.listdir(work)) == [source.name]  # no destination, no temporary
    assert result.peak_rss < 1.75 * 2**30, result.peak_rss


def test_caffe_conversion_checks_shapes_before_arithmetic_that_could_broadcast(tmp_path):
    # A running mean of shape (4096, 1) minus a bias of (4096,) would broadcast to 4096 x 4096
    # (64 MiB here; 16 GiB at 65536) before any shape was compared with the model's.
    import models
    from models.bn_inception_weights import from_caffe_state_dict

    model = models.bn_inception(
        input_shape=(32, 32, 3), weights=None, width_multiplier=1 / 32, min_depth=1
    )
    n = 4096
    obj = {
        "conv1_7x7_s2.weight": tensor((2, 3, 7, 7), (147, 49, 7, 1)),
        "conv1_7x7_s2.bias": tensor((n,), (1,), key="1"),
        "conv1_7x7_s2_bn.running_mean": tensor((n, 1), (1, 1), key="1"),
        "conv1_7x7_s2_bn.running_var": tensor((n, 1), (1, 1), key="1"),
        "conv1_7x7_s2_bn.weight": tensor((n, 1), (1, 1), key="1"),
        "conv1_7x7_s2_bn.bias": tensor((n, 1), (1, 1), key="1"),
    }
    path = zip_pth(tmp_path / "x.pth", obj, {"0": bytes(4 * 294), "1": bytes(4 * n)})
    error, peak = peak_traced_bytes(from_caffe_state_dict, str(path), model)
    assert type(error) is ValueError, error
    assert "'conv1_7x7_s2.bias' has shape (4096,)" in str(error) and "(2,)" in str(error)
    assert peak < 4 * MiB


# ------------------------------------------------------------------------------------------
# 2. Image folders: regular files only, with a size and a pixel bound.
# ------------------------------------------------------------------------------------------


def png_bytes(width, height, pixels=b"\0\0"):
    """A complete grayscale PNG declaring `width` x `height` (the pixel data need not fill it:
    the header alone is what an image folder reads when it loads)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixels))
        + chunk(b"IEND", b"")
    )


def image_folder_with(tmp_path, name, make):
    """Two classes of one 2x1 PNG each, and `make(path)` creating `a/<name>` (sorted first)."""
    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        (folder / label / "z.png").write_bytes(png_bytes(2, 1, b"\0\x10\x20"))
    make(folder / "a" / name)
    return folder


@pytest.mark.parametrize(
    ("name", "make", "what"),
    [
        ("zero.png", lambda path: os.symlink("/dev/zero", path), "a character device"),
        ("pipe.jpg", os.mkfifo, "a FIFO (named pipe)"),
    ],
)
def test_train_on_a_folder_with_a_device_or_fifo_named_like_an_image_stops_in_one_line(
    tmp_path, name, make, what
):
    # Before: the link to /dev/zero read 4.6 GB and ended in a traceback; the FIFO blocked
    # train.py forever.
    folder = image_folder_with(tmp_path, name, make)
    line, result = train_py_error(tmp_path, "--dataset", f"image_folder:{folder}", timeout=120)
    assert f"{folder / 'a' / name}: {what}, not an image file" in line
    assert result.peak_rss < 2**30, result.peak_rss


def test_files_too_large_to_be_images_are_refused_without_being_read(tmp_path):
    from bnzoo.data import load_dataset
    from bnzoo.data.image_folder import MAX_IMAGE_FILE_BYTES

    def sparse_png(path):
        path.write_bytes(png_bytes(2, 1))
        os.truncate(path, MAX_IMAGE_FILE_BYTES + 1)  # sparse: no disk used

    folder = image_folder_with(tmp_path, "huge.png", sparse_png)
    outcome, peak = peak_traced_bytes(load_dataset, f"image_folder:{folder}", split="train")
    assert type(outcome) is ValueError
    assert f"{folder / 'a' / 'huge.png'}: 268,435,457 bytes, more than the 256 MiB" in str(outcome)
    assert peak < 16 * MiB


def test_an_image_declaring_ten_billion_pixels_is_refused_when_the_folder_loads(tmp_path):
    # 100,000 x 100,000 in a 70-byte PNG: TensorFlow would decode it into 10 GB per image.
    from bnzoo.data import load_dataset

    folder = image_folder_with(
        tmp_path, "bomb.png", lambda path: path.write_bytes(png_bytes(100_000, 100_000))
    )
    with pytest.raises(ValueError, match="declares 100000 x 100000 pixels, more than the"):
        load_dataset(f"image_folder:{folder}", split="train")
    assert os.path.getsize(folder / "a" / "bomb.png") < 100


def test_a_broken_link_named_like_an_image_is_named(tmp_path):
    from bnzoo.data import load_dataset

    folder = image_folder_with(tmp_path, "gone.png", lambda path: os.symlink("nowhere", path))
    with pytest.raises(ValueError, match="gone.png: a broken symbolic link"):
        load_dataset(f"image_folder:{folder}", split="train")


def test_jpeg_header_search_gives_up_on_junk_after_a_megabyte(tmp_path):
    from bnzoo.data.image_folder import inspect_image_file

    path = tmp_path / "junk.jpg"
    path.write_bytes(b"\xff\xd8" + b"\0" * (8 * MiB))
    with pytest.raises(ValueError, match="no JPEG marker in the first megabyte"):
        inspect_image_file(str(path))


# ------------------------------------------------------------------------------------------
# IDX files (--manual-dir): the header's size is checked before the payload is inflated.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2**32 - 1,) * 3, "more than the 1,073,741,824 bytes expected here"),
        ((10, 28, 28), "7840 bytes of data) but the file holds more"),
    ],
)
def test_an_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path, shape, message):
    from bnzoo.data.idx import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
    path.write_bytes(gzip.compress(header + bytes(64 * MiB)))
    assert os.path.getsize(path) < 100_000
    error, peak = peak_traced_bytes(read_idx, path)
    assert type(error) is ValueError and message in str(error), error
    assert str(path) in str(error)
    assert peak < 4 * MiB  # 64 MiB when the whole file was inflated first


# ------------------------------------------------------------------------------------------
# 3. .keras files: the config is bounded before Keras parses it, the inputs before it builds.
# ------------------------------------------------------------------------------------------


def keras_archive(path, config_json, members=()):
    """A `.keras` archive with this config.json (bytes) and other members."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.0"}))
        archive.writestr("config.json", config_json)
        for name, data, compression in members:
            archive.writestr(name, data, compress_type=compression)
    return path


def deep_config(depth=100_000):
    """A config.json nested `depth` lists deep inside a layer's config."""
    return (
        b'{"class_name": "Sequential", "config": {"layers": ' + b"[" * depth + b"]" * depth + b"}}"
    )


def test_train_with_a_100_000_deep_keras_config_stops_in_one_line(tmp_path):
    # Before: a RecursionError traceback from json, after the dataset had been loaded.
    source = keras_archive(tmp_path / "deep.keras", deep_config())
    line, _ = train_py_error(tmp_path, "--weights", source)
    assert f"--weights {source}: its config.json nests deeper than Python can parse" in line


@pytest.mark.parametrize(
    ("config", "members", "message"),
    [
        (deep_config(400), (), "nests 402 levels deep, more than the 300"),
        (b"[1, 2]", (), "does not describe a Keras model"),
        (b"{not json", (), "is not valid JSON"),
        (b"{}" + b" " * (16 * MiB), (), "more than the 16,777,216"),
        (
            b'{"class_name": "Sequential"}',
            [("assets/x", bytes(64 * MiB), zipfile.ZIP_DEFLATED)],
            "a zip bomb",
        ),
    ],
)
def test_crafted_keras_archives_are_refused_before_keras_or_tensorflow(
    tmp_path, config, members, message
):
    from bnzoo.evaluation import locate_model

    path = keras_archive(tmp_path / "crafted.keras", config, members)
    error, peak = peak_traced_bytes(locate_model, str(path))
    assert type(error) is ValueError and message in str(error), error
    assert str(path) in str(error)
    assert peak < 24 * MiB


def hdf5_weights(path, shapes):
    """A `.weights.h5`-like HDF5 file with datasets of these shapes, chunked and compressed,
    holding nothing but their fill value (a few kilobytes)."""
    import h5py

    with h5py.File(path, "w") as h5:
        for name, shape in shapes.items():
            h5.create_dataset(name, shape=shape, dtype="f4", chunks=True, compression="gzip")
    return path


def test_a_few_kilobytes_of_hdf5_declaring_a_gibibyte_are_refused_before_keras_reads_them(
    tmp_path,
):
    # Measured before: Keras read such a dataset whole (its own guard starts at 4 GiB) and
    # the process grew by 4 GiB before the shape comparison failed.
    import models
    from models.weight_files import check_hdf5_file

    model = models.bn_inception(
        input_shape=(32, 32, 3), weights=None, width_multiplier=1 / 32, min_depth=1
    )
    path = str(tmp_path / "bomb.weights.h5")
    model.save_weights(path)
    import h5py

    with h5py.File(path, "r+") as h5:
        kernels = []
        h5.visititems(lambda name, obj: kernels.append(name) if name.endswith("vars/0") else None)
        del h5[kernels[0]]
        h5.create_dataset(kernels[0], shape=(2**26,), dtype="f4", chunks=True, compression="gzip")
    assert os.path.getsize(path) < 2 * MiB
    with pytest.raises(ValueError, match=r"declares [\d,]+ bytes of data in [\d,]+ bytes"):
        check_hdf5_file(path)
    error, peak = peak_traced_bytes(
        models.bn_inception,
        input_shape=(32, 32, 3),
        weights=path,
        width_multiplier=1 / 32,
        min_depth=1,
    )
    assert type(error) is ValueError and f"weights file {path!r} declares" in str(error), error
    assert peak < 64 * MiB  # 256 MiB for the dataset alone when Keras read it


def test_hdf5_datasets_stored_in_other_files_are_refused(tmp_path):
    import h5py

    from models.weight_files import check_hdf5_file

    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(64))
    path = str(tmp_path / "external.weights.h5")
    with h5py.File(path, "w") as h5:
        h5.create_dataset("layers/x/vars/0", shape=(16,), dtype="f4", external=[(secret, 0, 64)])
    with pytest.raises(ValueError, match="is stored in other files"):
        check_hdf5_file(path)
    with h5py.File(path, "w") as h5:
        h5["layers/x/vars/0"] = h5py.ExternalLink(str(secret), "/data")
    with pytest.raises(ValueError, match="links to another file"):
        check_hdf5_file(path)


def test_evaluate_a_keras_model_whose_inputs_are_100000_squared_in_one_line(tmp_path):
    # Before: a 51-line ResourceExhaustedError once the first batch was resized.
    import keras

    inputs = keras.Input((100_000, 100_000, 1))
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs))
    path = tmp_path / "huge_input.keras"
    keras.Model(inputs, outputs).save(path)
    result = run_measured(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), path, "--split", "test[:8]"],
        cwd=tmp_path,
        timeout=180,
    )
    line = one_error_line(result, 1, "evaluate.py")
    assert f"{path} takes 100000x100000x1 inputs: one example needs about 149.0 GiB" in line
    assert "it cannot be evaluated here" in line
    assert result.peak_rss < 2**31, result.peak_rss
    assert sorted(os.listdir(tmp_path)) == ["huge_input.keras"]


def test_inference_memory_check_names_a_batch_size_that_fits(monkeypatch):
    from bnzoo import memory

    monkeypatch.setattr(memory, "host_memory", lambda: (2**30, "available memory"))
    monkeypatch.setattr(memory, "gpu_memory", lambda: None)
    per_example = 512 * 512 * 3 * memory.INFERENCE_BYTES_PER_VALUE  # 12 MiB
    memory.check_inference_fits((512, 512, 3), 2**30 // per_example, "m.keras")
    with pytest.raises(ValueError, match="batches of 256 need about 3.0 GiB.*--batch-size 85 or"):
        memory.check_inference_fits((512, 512, 3), 256, "m.keras")


# ------------------------------------------------------------------------------------------
# 4. Messages that name the file and the real cause.
# ------------------------------------------------------------------------------------------


def test_train_with_a_text_file_as_h5_weights_says_it_is_not_hdf5(tmp_path):
    # Before: "--weights x.h5 needs 3-channel (RGB) images, but fashion_mnist has 1-channel".
    source = tmp_path / "x.h5"
    source.write_text("these are not weights\n")
    line, _ = train_py_error(tmp_path, "--weights", source)
    assert f"--weights {str(source)!r} is not an HDF5 file (it starts with 7468657365" in line


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.weights.h5", b"plain text", "--weights {path!r} is not an HDF5 file"),
        ("x.pth", b"plain text", "--weights {path!r} is not a PyTorch file"),
        ("x.ckpt", b"plain text", "--weights {path!r} is not a TensorFlow checkpoint"),
        ("x.keras", b"plain text", "--weights {path} is not a .keras model (not a zip"),
    ],
)
def test_weights_files_that_are_not_of_their_kind_are_named_before_anything_runs(
    tmp_path, name, content, message
):
    from bnzoo.config import TrainConfig
    from bnzoo.fine_tuning import check_weights_source

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        check_weights_source(TrainConfig(model="bn_inception", weights=str(path)))
    assert message.format(path=str(path)) in str(raised.value)


def test_a_builder_given_a_text_file_as_weights_names_it_instead_of_blaming_the_architecture(
    tmp_path,
):
    # Before: "weights file ... does not match the architecture of 'bn_inception' (Unable to
    # synchronously open file (file signature not found))".
    import models

    path = tmp_path / "x.weights.h5"
    path.write_text("not weights")
    with pytest.raises(ValueError, match=f"weights file '{path}' is not an HDF5 file"):
        models.bn_inception(weights=str(path), width_multiplier=1 / 32, min_depth=1)


def test_evaluating_a_keras_archive_whose_weights_are_not_hdf5_names_both(tmp_path):
    # Before: "cannot load ... as a Keras model: Unable to synchronously open file (file
    # signature not found)".
    import keras

    from bnzoo.model_files import load_keras_model

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    good = tmp_path / "good.keras"
    model.save(good)
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(broken, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, b"not hdf5" if info.filename == "model.weights.h5" else data)
    with pytest.raises(ValueError, match=f"the weights '{broken}/model.weights.h5' is not an HDF5"):
        load_keras_model(str(broken))
    assert load_keras_model(str(good)).count_params() == 10


def test_keras_safe_mode_refuses_a_lambda_layer(tmp_path):
    import keras

    from bnzoo.model_files import load_keras_model

    marker = tmp_path / "ran"

    def touch(x, path=str(marker)):
        open(path, "w").close()  # noqa: SIM115 - the payload
        return x

    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((2,)), keras.layers.Lambda(touch)]).save(path)
    os.remove(marker)  # written once, when the model was built here
    with pytest.raises(ValueError, match="safe_mode"):
        load_keras_model(str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# 5. A SavedModel is a program: evaluating one runs its code (issue 15 §4, docs/security.md).
# ------------------------------------------------------------------------------------------


def test_evaluating_a_saved_model_runs_whatever_its_serving_function_does(tmp_path):
    """Not a defect bnzoo can fix: TensorFlow executes a SavedModel's graph, and a graph can
    write files (tf.io.write_file), read them or open sockets. This test pins the fact the
    documentation states, so that it stays true: evaluate untrusted models as `.keras` files
    (safe_mode) or in a sandbox."""
    import tensorflow as tf

    from bnzoo.evaluation import evaluate_path

    written = tmp_path / "written-by-the-model.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)])
        def serve(self, images):
            tf.io.write_file(str(written), "a SavedModel ran this")
            return {"logits": tf.zeros([tf.shape(images)[0], 10])}

    module = Writer()
    path = str(tmp_path / "saved_model")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    assert not written.exists()
    metrics = evaluate_path(path, dataset="fashion_mnist", split="test[:4]")
    assert metrics["num_examples"] == 4
    assert written.read_text() == "a SavedModel ran this"


def test_a_saved_model_that_runs_out_of_memory_is_one_line(tmp_path):
    # What a SavedModel allocates is known only when it runs; an out-of-memory error was a
    # 51-line traceback.
    import tensorflow as tf

    from bnzoo.evaluation import evaluate_path

    class Greedy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.uint8)])
        def serve(self, images):
            huge = tf.zeros([tf.shape(images)[0], 2**20, 2**20])  # 4 TiB per image
            return {"logits": tf.reduce_sum(huge, axis=2)[:, :10]}

    module = Greedy()
    path = str(tmp_path / "saved_model")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    with pytest.raises(ValueError, match=f"{path} ran out of memory on batches of 4; use a"):
        evaluate_path(path, dataset="fashion_mnist", split="test[:4]", batch_size=4)
