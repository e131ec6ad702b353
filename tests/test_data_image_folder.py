"""The image-folder dataset on small PNG/JPEG/BMP/GIF folders that the tests write themselves."""

import numpy as np
import pytest
import tensorflow as tf

from bnzoo.data import load_dataset, make_pipeline, naming_undecodable_images, overlapping_examples
from bnzoo.data.image_folder import inspect_image_file, select_split, stratified_order

Image = pytest.importorskip("PIL.Image")

# Each class's images are filled with the class's own gray level, so an (image, label) pair
# shows whether the label names the folder the image came from.
CLASS_LEVELS = {"dog": 30, "bird": 90, "cat": 150}


def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _class_folder(root, per_class=4, size=(6, 8), channels=1, fmt="png"):
    for name, level in CLASS_LEVELS.items():  # created in non-sorted order on purpose
        for i in range(per_class):
            shape = size if channels == 1 else (*size, channels)
            _save(root / name / f"{i:02d}.{fmt}", np.full(shape, level, np.uint8))
    return f"image_folder:{root}"


def _examples(ds):
    images, labels = zip(*[(x.numpy(), int(y.numpy())) for x, y in ds], strict=True)
    return np.stack(images), np.array(labels)


def test_class_names_are_sorted_subfolders_and_labels_follow_them(tmp_path):
    ds, info = load_dataset(_class_folder(tmp_path), split="train")
    assert info.class_names == ("bird", "cat", "dog")
    assert info.num_classes == 3 and info.num_examples == 12
    assert info.image_shape == (6, 8, 1)
    assert info.mean == (0.5,) and info.std == (0.5,)
    assert ds.element_spec[0].dtype == tf.uint8 and ds.element_spec[1].dtype == tf.int64
    images, labels = _examples(ds)
    for image, label in zip(images, labels, strict=True):
        assert np.all(image == CLASS_LEVELS[info.class_names[label]])
    assert np.bincount(labels).tolist() == [4, 4, 4]


def test_every_supported_format_decodes_to_its_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    # A GIF has a palette of at most 256 colours: four distinct colours survive exactly.
    four_colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    gif = four_colours[rng.integers(0, 4, (10, 12))]
    smooth = np.broadcast_to(np.linspace(0, 255, 12, dtype=np.uint8)[None, :, None], (10, 12, 3))
    expected = {"a.png": rgb, "b.bmp": rgb, "c.gif": gif, "d.jpg": np.ascontiguousarray(smooth)}
    for name, array in expected.items():
        _save(tmp_path / "only" / name, array)
    (tmp_path / "only" / "notes.txt").write_text("not an image: ignored")
    ds, info = load_dataset(f"image_folder:{tmp_path}", split="train")
    assert info.num_examples == 4 and info.image_shape == (10, 12, 3)
    decoded = sorted((x.numpy() for x, _ in ds), key=lambda a: a.tobytes())
    lossless = sorted((expected[n] for n in ("a.png", "b.bmp", "c.gif")), key=lambda a: a.tobytes())
    # JPEG is lossy: the smooth ramp comes back within a few levels; the others exactly.
    jpeg = [d for d in decoded if not any(np.array_equal(d, e) for e in lossless)]
    assert len(jpeg) == 1
    assert np.abs(jpeg[0].astype(int) - smooth).mean() < 3
    for array in lossless:
        assert any(np.array_equal(array, d) for d in decoded)


@pytest.mark.parametrize(
    "name, mode, expected",
    [
        ("gray.png", "L", (5, 7, 1)),
        ("gray_alpha.png", "LA", (5, 7, 2)),
        ("rgba.png", "RGBA", (5, 7, 4)),
        ("palette.png", "P", (5, 7, 3)),
        ("gray.jpg", "L", (5, 7, 1)),
        ("progressive.jpg", "RGB", (5, 7, 3)),
        ("cmyk.jpg", "CMYK", (5, 7, 3)),
        ("gray.bmp", "L", (5, 7, 1)),
        ("rgb.bmp", "RGB", (5, 7, 3)),
        ("gray.gif", "L", (5, 7, 3)),
    ],
)
def test_header_reader_predicts_the_shape_tensorflow_decodes(tmp_path, name, mode, expected):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / name
    image.save(path, progressive=name.startswith("progressive"))
    decoded = tf.io.decode_image(path.read_bytes(), channels=0, expand_animations=False)
    assert inspect_image_file(str(path)) == (*expected, True)
    assert expected == tuple(decoded.shape)


def test_grayscale_folder_has_one_channel_and_a_mixed_folder_three(tmp_path):
    _save(tmp_path / "a" / "gray.png", np.full((4, 4), 200, np.uint8))
    _save(tmp_path / "b" / "gray_alpha.png", np.full((4, 4, 2), 100, np.uint8))
    _, info = load_dataset(f"image_folder:{tmp_path}", split="train")
    assert info.image_shape == (4, 4, 1)
    _save(tmp_path / "b" / "rgb.bmp", np.full((4, 4, 3), (10, 20, 30), np.uint8))
    ds, info = load_dataset(f"image_folder:{tmp_path}", split="train")
    assert info.image_shape == (4, 4, 3)
    images = sorted((x.numpy() for x, _ in ds), key=lambda a: int(a[0, 0, 0]))
    # Grayscale images are expanded to three equal channels, RGB keeps its colour, alpha is
    # dropped.
    assert [tuple(a[0, 0]) for a in images] == [(10, 20, 30), (100, 100, 100), (200, 200, 200)]


def test_split_slices_partition_the_folder_deterministically_and_mix_classes(tmp_path):
    name = _class_folder(tmp_path, per_class=10)
    _, head = load_dataset(name, split="train[:80%]")
    _, tail = load_dataset(name, split="train[80%:]")
    assert (head.num_examples, tail.num_examples) == (24, 6)
    head_images, head_labels = _examples(load_dataset(name, split="train[:80%]")[0])
    tail_labels = _examples(load_dataset(name, split="train[80%:]")[0])[1]
    all_labels = _examples(load_dataset(name, split="train")[0])[1]
    # The slices are consecutive pieces of one fixed order, so they partition the folder.
    np.testing.assert_array_equal(np.concatenate([head_labels, tail_labels]), all_labels)
    # The order is shuffled across classes (sorted paths would give a test slice of one class)
    # and the same on every call.
    assert len(set(tail_labels.tolist())) > 1
    np.testing.assert_array_equal(
        _examples(load_dataset(name, split="train[:80%]")[0])[1], head_labels
    )
    _, first = load_dataset(name, split="train[:5]")
    _, joined = load_dataset(name, split="train[:10%]+train[-10%:]")
    assert (first.num_examples, joined.num_examples) == (5, 6)


def test_images_of_different_sizes_need_an_image_size_for_batching(tmp_path):
    _save(tmp_path / "a" / "small.png", np.full((4, 6), 50, np.uint8))
    _save(tmp_path / "b" / "large.png", np.full((8, 10), 50, np.uint8))
    ds, info = load_dataset(f"image_folder:{tmp_path}", split="train")
    assert info.image_shape == (None, None, 1)
    assert sorted(tuple(x.shape) for x, _ in ds) == [(4, 6, 1), (8, 10, 1)]
    with pytest.raises(ValueError, match=r"vary in size; pass image_size"):
        make_pipeline(ds, info, batch_size=2)
    batches = make_pipeline(ds, info, batch_size=2, training=False, image_size=(5, 5))
    images, _ = next(iter(batches))
    assert images.shape == (2, 5, 5, 1)
    # A uniform image stays uniform under resizing: (50/255 - 0.5) / 0.5 everywhere.
    np.testing.assert_allclose(images.numpy(), (50 / 255 - 0.5) / 0.5, atol=1e-5)


def test_missing_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
        load_dataset(f"image_folder:{tmp_path / 'nowhere'}", split="train")


def test_bad_layouts_and_unreadable_images_raise_value_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_dataset(f"image_folder:{tmp_path}", split="train")
    _save(tmp_path / "cat" / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*dog holds no images"):
        load_dataset(f"image_folder:{tmp_path}", split="train")
    (tmp_path / "dog" / "broken.png").write_text("this is not a PNG")
    with pytest.raises(ValueError, match=r"broken\.png: not a PNG, JPEG, BMP or GIF"):
        load_dataset(f"image_folder:{tmp_path}", split="train")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises(ValueError, match=r"broken\.png: .*(truncated|start-of-frame)"):
        load_dataset(f"image_folder:{tmp_path}", split="train")


@pytest.mark.parametrize(
    "split, message",
    [
        ("train[:50", "malformed split"),
        ("test", "one split, 'train'"),
        ("train[:500]", "not valid for image_folder"),
        ("train[50%:50%]", "selects no images"),
    ],
)
def test_bad_splits_of_an_image_folder_raise_value_errors(tmp_path, split, message):
    name = _class_folder(tmp_path, per_class=2)
    with pytest.raises(ValueError, match=message):
        load_dataset(name, split=split)


def test_empty_image_folder_prefix_is_rejected():
    with pytest.raises(ValueError, match="image_folder: needs a folder"):
        load_dataset("image_folder:", split="train")


def test_slices_of_the_folder_are_stratified_by_class(tmp_path):
    """The default train/validation/test slices hold each class in its share, to one image."""
    counts = {"bird": 20, "cat": 10, "dog": 30}
    for name, count in counts.items():
        for i in range(count):
            _save(tmp_path / name / f"{i:02d}.png", np.full((4, 4), 7, np.uint8))
    name = f"image_folder:{tmp_path}"
    seen = []
    for split, share in (("train[:80%]", 0.8), ("train[80%:90%]", 0.1), ("train[90%:]", 0.1)):
        labels = _examples(load_dataset(name, split=split)[0])[1]
        per_class = np.bincount(labels, minlength=3)
        expected = np.array([20, 10, 30]) * share
        assert np.all(np.abs(per_class - expected) <= 1), (split, per_class)
        seen.append(labels)
    assert sum(len(labels) for labels in seen) == 60  # a partition: nothing twice, nothing lost


@pytest.mark.parametrize(
    "sizes", [[50, 7, 143], [1000] + [3] * 100, [1, 1, 1], [2, 3]], ids=["3", "101", "1-each", "5"]
)
def test_stratified_order_gives_each_default_slice_its_share_of_every_class(sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    order = stratified_order(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for split, share in (("train[:80%]", 0.8), ("train[80%:90%]", 0.1), ("train[90%:]", 0.1)):
        selected = labels[order[select_split(len(labels), split)]]
        counts = np.bincount(selected, minlength=len(sizes))
        assert np.all(np.abs(counts - share * np.array(sizes)) < 1), (split, counts)
    np.testing.assert_array_equal(order, stratified_order(labels))  # seeded: the same each time
    # Other slices mix the classes too: the first tenth is not one class.
    if len(labels) >= 20:
        assert len(set(labels[order[: len(labels) // 10]].tolist())) > 1


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["png", "jpg", "gif", "bmp"])
def test_a_truncated_image_is_named_when_the_folder_loads(tmp_path, fmt):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(2):
            array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            _save(tmp_path / name / f"{i}.{fmt}", array)
    _truncate(tmp_path / "b" / f"1.{fmt}")
    with pytest.raises(ValueError, match=rf"b/1\.{fmt}: truncated or damaged image, TensorFlow"):
        load_dataset(f"image_folder:{tmp_path}", split="train")


@pytest.mark.parametrize("fmt", ["png", "jpg", "gif"])
def test_bytes_after_the_end_of_an_image_do_not_make_it_broken(tmp_path, fmt):
    """Phones append data after a JPEG's end (motion photos); decoders ignore it, so do we."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _save(tmp_path / name / f"0.{fmt}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    path = tmp_path / "b" / f"0.{fmt}"
    path.write_bytes(path.read_bytes() + b"\0" * 5000)
    _, info = load_dataset(f"image_folder:{tmp_path}", split="train")
    assert info.num_examples == 2


def test_a_png_signature_without_a_header_is_called_a_broken_png(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(ValueError, match=r"x\.png: cannot read the image \(a PNG signature but no"):
        load_dataset(f"image_folder:{tmp_path}", split="train")
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"a PNG signature, then the file ends \(truncated\)"):
        load_dataset(f"image_folder:{tmp_path}", split="train")


def test_a_file_given_as_the_image_folder_is_called_a_file(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"images\.zip is a file, not a folder"):
        load_dataset(f"image_folder:{tmp_path / 'images.zip'}", split="train")


def test_damage_found_only_when_decoding_is_reported_naming_the_file(tmp_path):
    """Zeros inside a PNG's pixel data: the header and the end marker are intact, so only
    decoding fails, inside tf.data, with no file name; the context manager finds it."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(3):
            _save(tmp_path / name / f"{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    path = tmp_path / "a" / "2.png"
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\0" * 16 + data[116:])
    ds, _ = load_dataset(f"image_folder:{tmp_path}", split="train")
    with pytest.raises(ValueError, match=rf"^{path}: TensorFlow cannot decode this image \(Inv"):
        with naming_undecodable_images():
            list(ds)
    with pytest.raises(ZeroDivisionError), naming_undecodable_images():  # others pass through
        raise ZeroDivisionError


def test_a_decode_error_names_the_file_of_the_folder_loaded_last(tmp_path):
    """A folder with a damaged file loaded earlier in the process (a notebook, a test session)
    is not blamed for the decode error of the one read now."""
    rng = np.random.default_rng(0)
    damaged = {}
    for folder in ("earlier", "later"):  # sorted by name, "earlier" would come first
        for name in ("a", "b"):
            for i in range(3):
                image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
                _save(tmp_path / folder / name / f"{i}.png", image)
        path = damaged[folder] = tmp_path / folder / "b" / "1.png"
        data = path.read_bytes()
        path.write_bytes(data[:100] + b"\0" * 16 + data[116:])
    load_dataset(f"image_folder:{tmp_path / 'earlier'}", split="train")
    ds, _ = load_dataset(f"image_folder:{tmp_path / 'later'}", split="train")
    with pytest.raises(ValueError, match=rf"^{damaged['later']}: TensorFlow cannot decode"):
        with naming_undecodable_images():
            list(ds)


def test_overlap_between_split_expressions_is_counted(tmp_path):
    name = _class_folder(tmp_path, per_class=10)
    assert overlapping_examples(name, "train[:80%]", "train[80%:]") == 0
    assert overlapping_examples(name, "train[:80%]", "train[50%:]") == 9
    assert overlapping_examples(name, "train", "train[:3]+train[-3:]") == 6
    load_dataset("fashion_mnist", split="train[:1]")  # split sizes are known once prepared
    assert overlapping_examples("fashion_mnist", "train[:90%]", "train[80%:]") == 6000
    assert overlapping_examples("fashion_mnist", "train", "test") == 0
