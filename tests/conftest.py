"""Test-wide settings: offline, caches inside a temporary work dir, few threads."""

from __future__ import annotations

import os
import tempfile

# Set before any library import so nothing reaches for the network or the user's home.
_WORK = os.environ.setdefault("CONAN_WORK_DIR", tempfile.mkdtemp(prefix="conan-test-work-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_WORK, "hf_home"))
os.environ.setdefault("PREFECT_HOME", os.path.join(_WORK, "prefect_home"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_WORK, "mpl"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from conan_core.paths import offline_env  # noqa: E402

offline_env()
