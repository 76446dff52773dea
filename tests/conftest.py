import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # the suite's models are tiny: one thread is fastest and immune to a busy second core


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes over ~5 s (deselect with -m 'not slow')")
