"""Where things live: the project root, the work dir for caches and outputs, the shared data dir.

Every cache (Hugging Face, Prefect, Ray, mteb, matplotlib) is kept inside the work dir so a run
never writes into the user's home and never reaches for the network.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def work_dir() -> Path:
    """The project's working dir (outputs and caches); `CONAN_WORK_DIR` overrides `./work`."""
    path = Path(os.environ.get("CONAN_WORK_DIR", PROJECT_ROOT / "work")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path:
    """The shared real data; `CONAN_DATA_DIR` overrides `<project>/../shared/data`."""
    return Path(os.environ.get("CONAN_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data")).resolve()


def offline_env() -> dict[str, str]:
    """Set (without overriding explicit settings) the env that keeps every run offline and local.

    Returns the variables it set, so callers can hand the same env to subprocesses / Ray workers.
    """
    work = work_dir()
    wanted = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf_home"),
        "PREFECT_HOME": str(work / "prefect_home"),
        "MPLCONFIGDIR": str(work / "mpl"),
        "TOKENIZERS_PARALLELISM": "false",
        "MTEB_CACHE": str(work / "mteb_cache"),
    }
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in wanted}
