"""Preparing TFDS datasets without network: from local IDX files, or failing fast.

TFDS's `fashion_mnist` and `mnist` builders download four gzip archives and check them against
registered checksums. Offline, that download retries for minutes before failing, and Debian's
recompressed copies of the files can never match the checksums. So, when the IDX files are on
disk, bnzoo prepares the real TFDS dataset from them itself: a builder subclass that keeps the
registered builder's name, version and features (so `tfds.load("fashion_mnist", data_dir=...)`
reads the result like any other prepared dataset) and feeds it the verified arrays of
`bnzoo.data.idx.load_idx_dataset` instead of downloaded files. Examples keep MNIST's keys (the
index in the file), so the prepared dataset is example-for-example the one TFDS would build.

For every other dataset bnzoo checks the network within a few seconds before letting TFDS
download, and otherwise raises a `FileNotFoundError` that says how to get the data.
"""

from __future__ import annotations

import os
import socket

import tensorflow as tf
import tensorflow_datasets as tfds

from bnzoo.data.idx import IDX_DATASETS, load_idx_dataset, locate_idx_dir, missing_idx_files

# Where TFDS downloads most datasets from (and its prepared-dataset mirror); reaching it is a
# cheap proxy for "TFDS can download".
NETWORK_PROBE = ("storage.googleapis.com", 443)
NETWORK_PROBE_TIMEOUT_S = 3.0


def network_available(
    address: tuple[str, int] = NETWORK_PROBE, timeout: float = NETWORK_PROBE_TIMEOUT_S
) -> bool:
    """Whether a TCP connection to `address` opens within `timeout` seconds.

    TFDS's own downloader retries with backoff for minutes when there is no network; this
    answers in at most `timeout` seconds (immediately when DNS fails, as on an offline machine).
    """
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


@tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8)])
def _encode_png_batch(images):
    return tf.map_fn(
        tf.io.encode_png, images, fn_output_signature=tf.string, parallel_iterations=16
    )


def _encode_png_in_parallel(images, chunk: int = 1000):
    """PNG bytes of each uint8 [H, W, C] image, encoded a chunk at a time on all cores.

    TFDS would encode each image itself with one `tf.io.encode_png` call at a time, which is
    most of the preparation time for 70,000 small images. The same op with the same default
    settings, run in parallel inside one graph per chunk, yields the same bytes; TFDS stores
    bytes it is given as already-encoded images.
    """
    for start in range(0, len(images), chunk):
        yield from _encode_png_batch(images[start : start + chunk]).numpy()


def idx_builder(name: str, directory: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """A TFDS builder for `name` that prepares from the verified IDX files in `directory`.

    The builder is the registered TFDS builder with only its data source replaced: same name,
    version, features and split names, so the prepared folder
    (`<data_dir>/<name>/<version>/`) is read by `tfds.load(name, data_dir=data_dir)` as usual.

    Args:
        name: A key of `bnzoo.data.idx.IDX_DATASETS` (`"fashion_mnist"`, `"mnist"`).
        directory: Folder with the four IDX files.
        data_dir: TFDS data folder; None means TFDS's default (`~/tensorflow_datasets` or
            `$TFDS_DATA_DIR`).
    """
    spec = IDX_DATASETS[name]
    registered = tfds.builder_cls(name)
    dataset_name = name

    class LocalIdxBuilder(registered, skip_registration=True):
        # Keep the registered name: it decides the prepared folder TFDS reads later.
        name = dataset_name

        def _split_generators(self, dl_manager):
            del dl_manager  # the files are local; nothing to download
            splits = load_idx_dataset(spec, directory)
            return [
                tfds.core.SplitGenerator(
                    name=split, gen_kwargs={"images": images, "labels": labels}
                )
                for split, (images, labels) in splits.items()
            ]

        def _generate_examples(self, images, labels):
            # Same keys as TFDS's MNIST builder (the position in the file), so TFDS's key-based
            # shuffling gives the same example order as a downloaded copy.
            encoded = _encode_png_in_parallel(images)
            for index, (png, label) in enumerate(zip(encoded, labels, strict=True)):
                yield index, {"image": png, "label": label}

    LocalIdxBuilder.__name__ = f"LocalIdx{registered.__name__}"
    return LocalIdxBuilder(data_dir=data_dir)


def prepare_from_idx(
    name: str, data_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """Prepares TFDS dataset `name` from local IDX files, unless it is prepared already.

    Args:
        name: `"fashion_mnist"` or `"mnist"`.
        data_dir: TFDS data folder (None: TFDS's default).
        manual_dir: Folder with the IDX files; None searches the dataset's default folders
            (`/usr/share/datasets/fashion-mnist` for Fashion-MNIST).

    Returns:
        The registered TFDS builder for `name`, prepared and ready for `as_dataset`.

    Raises:
        FileNotFoundError: the IDX files are not found; the message says how to get them.
        ValueError: a file is corrupt or holds another dataset; the message names the file.

    Example:
    >>> builder = bnzoo.data.tfds_offline.prepare_from_idx("fashion_mnist", "/tmp/tfds")
    >>> tfds.load("fashion_mnist", split="test", data_dir="/tmp/tfds")  # works from now on
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    directory = locate_idx_dir(IDX_DATASETS[name], manual_dir)
    local = idx_builder(name, directory, data_dir=data_dir)
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
        local.download_and_prepare(download_config=config)
    except Exception:
        # Another process may have prepared the same folder first (TFDS writes to a temporary
        # folder and renames it, so only the rename races); its result is as good as ours.
        if not tfds.builder(name, data_dir=data_dir).is_prepared():
            raise
    return tfds.builder(name, data_dir=data_dir)


def prepare_tfds(
    name: str, data_dir: str | None = None, manual_dir: str | None = None
) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `name`: reused, prepared from local files, or downloaded.

    Order: (1) a dataset already prepared in `data_dir` is reused; (2) datasets bnzoo can build
    from IDX files (`fashion_mnist`, `mnist`) are prepared from `manual_dir` or their default
    folder when the files are there, with no network; (3) anything else is downloaded by TFDS
    when the network answers within seconds, with `manual_dir` passed on for TFDS datasets that
    need manually downloaded files.

    Raises:
        FileNotFoundError: the data is neither prepared, nor local, nor downloadable.
        ValueError: local files are corrupt.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    base_name = name.split(":", 1)[0]
    if base_name in IDX_DATASETS:
        spec = IDX_DATASETS[base_name]
        explicit = manual_dir is not None
        have_local = explicit or any(
            os.path.isdir(d) and not missing_idx_files(spec, d) for d in spec.default_dirs
        )
        if have_local or not network_available():
            # Either way the IDX path gives the most useful outcome: the dataset, or an error
            # that says which files are missing and how to get them.
            return prepare_from_idx(base_name, data_dir=data_dir, manual_dir=manual_dir)
    elif not network_available():
        location = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {location} and TFDS cannot download it: no "
            f"network ({NETWORK_PROBE[0]} is unreachable). Prepare it on a machine with network "
            f"(tfds build {name} --data_dir DIR), copy DIR here and pass it as --data-dir."
        )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=config)
    return builder
