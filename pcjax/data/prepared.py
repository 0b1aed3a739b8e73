"""Whether a TFDS dataset is prepared as array_record, told from its files; how to prepare it.

Plain filesystem calls (`etils.epath`), no TensorFlow: config validation uses this before a run
starts anything. TFDS lays a prepared split out as `DATA_DIR/NAME/VERSION/NAME-SPLIT.FORMAT-*`
shard files, next to the version's `dataset_info.json`.
"""

from __future__ import annotations

import os
import sys

from etils import epath

from pcjax.data.datasets import DatasetSpec

DEFAULT_DATA_DIR = "$TFDS_DATA_DIR or ~/tensorflow_datasets"


class DataNotPreparedError(ValueError):
    """A TFDS dataset is missing from the data directory or not in the array_record format."""


def data_dir_or_default(data_dir: str | None) -> str:
    """The folder TFDS reads when given `data_dir` (`None`: $TFDS_DATA_DIR, else the default)."""
    if data_dir:
        return data_dir
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_command(name: str, data_dir: str | None) -> str:
    """The commands that prepare `name` as array_record in `data_dir` (Python API and TFDS CLI)."""
    dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    prepare = "download_and_prepare()"
    manual_flag = ""
    lines = []
    if name == "imagenet2012":
        manual = os.path.join(
            data_dir or os.path.expanduser("~/tensorflow_datasets"), "downloads", "manual"
        )
        config = f"tfds.download.DownloadConfig(manual_dir={manual!r})"
        prepare = f"download_and_prepare(download_config={config})"
        manual_flag = f" --manual_dir={manual}"
        lines.append(
            "ImageNet needs a manual download: register at https://image-net.org and put "
            f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual}/. Then run:"
        )
    else:
        lines.append("Prepare it once (it downloads the data) with:")
    lines += [
        f'    python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}{dir_arg}, '
        f"file_format='array_record').{prepare}\"",
        "or, where the TFDS command line works (it needs apache-beam):",
        f"    tfds build {name} --file_format=array_record{dir_flag}{manual_flag}",
    ]
    return "\n".join(lines)


def missing_folder_error(name: str, data_dir: str | None, folder: str) -> DataNotPreparedError:
    """The error for a dataset whose folder `folder` does not exist, with the prepare command."""
    return DataNotPreparedError(
        f"Dataset {name!r} is not in data_dir={data_dir or DEFAULT_DATA_DIR} (no folder "
        f"{folder.rstrip('/')}/).\n{prepare_command(name, data_dir)}"
    )


def _files_problem(dataset: DatasetSpec, data_dir: str | None) -> DataNotPreparedError | None:
    """What is missing from the files of `dataset` in `data_dir`, or None if nothing is."""
    name = dataset.name
    folder = epath.Path(data_dir_or_default(data_dir)) / name
    if not folder.is_dir():
        return missing_folder_error(name, data_dir, str(folder))
    for split in (dataset.train_split, dataset.eval_split):
        if any(folder.glob(f"*/{name}-{split}.array_record-*")):
            continue
        other = sorted(p.name for p in folder.glob(f"*/{name}-{split}.*"))
        found = f"found {other[0]}" if other else "no shard files"
        return DataNotPreparedError(
            f"Dataset {name!r} (split {split!r}) is not prepared in the array_record format in "
            f"data_dir={data_dir or DEFAULT_DATA_DIR} ({found} under {folder}).\n"
            f"{prepare_command(name, data_dir)}"
        )
    return None


def check_prepared(dataset: DatasetSpec, data_dir: str | None = None) -> None:
    """Raises DataNotPreparedError unless both splits of a TFDS `dataset` have array_record shards.

    Reads directory listings only. Where the shards are not found and TFDS is already imported
    in this process, TFDS opening the splits decides instead: it may resolve a layout this check
    does not (another registered data dir, a mocked TFDS in tests). It never imports TensorFlow.
    """
    if not dataset.tfds:
        return
    problem = _files_problem(dataset, data_dir)
    if problem is None:
        return
    if "tensorflow_datasets" not in sys.modules:
        raise problem
    from pcjax.data import sources  # TFDS and TensorFlow are loaded already

    for split in (dataset.train_split, dataset.eval_split):
        sources.open_source(dataset, split, data_dir)
