"""Every line in the seed's format, once: `[2025-05-15 22:34:46] message`."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging
from embedserve.log import configure_logging
from embedserve.model_config import ModelConfigError, resolve_model_folder
configure_logging("info")
try:
    resolve_model_folder("acme/not-cached")  # looked up in the cache through huggingface_hub
except ModelConfigError:
    pass
logging.getLogger("huggingface_hub.utils").warning("Retrying in 1s [Retry 1/5].")
"""


def test_huggingface_hub_lines_come_once_in_our_format(tmp_path):
    # NOTE: in a fresh interpreter: huggingface_hub adds its own handler when first imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env
    )
    lines = [line for line in result.stderr.splitlines() if "Retrying in 1s" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("[20") and lines[0].endswith("] Retrying in 1s [Retry 1/5].")
