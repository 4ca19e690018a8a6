"""A public dataset downloaded and extracted once under `paths.data_dir`; offline, one line says
what is missing, its URL and where to put it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from experiments.core.errors import ExperimentError
from experiments.data.decoding import first_line

log = logging.getLogger(__name__)


def download_and_extract(cfg, paths) -> Path:
    """The dataset's folder under paths.data_dir, downloading and extracting the archive once."""
    data_dir = Path(paths.data_dir)
    root = data_dir / cfg.folder
    if root.is_dir():
        return root
    archive_name = cfg.url.rsplit("/", 1)[-1]
    try:
        import keras

        data_dir.mkdir(parents=True, exist_ok=True)
        archive = keras.utils.get_file(
            archive_name, cfg.url, cache_dir=str(data_dir), cache_subdir=""
        )
    except Exception as err:  # get_file raises a bare Exception for every network failure
        raise ExperimentError(
            f"the {cfg.name} dataset is missing: {root} does not exist and downloading "
            f"{cfg.url} failed ({first_line(err)}). Download that archive and extract it into "
            f"{data_dir} so that {root} holds the class folders (or set paths.data_dir)"
        ) from None
    log.info("extracting %s into %s", archive, data_dir)
    shutil.unpack_archive(archive, data_dir)
    if not root.is_dir():
        raise ExperimentError(f"{archive} did not contain {cfg.folder}/; delete it and run again")
    return root
