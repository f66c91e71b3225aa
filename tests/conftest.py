import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TMP = ROOT / ".tmp"
_TMP.mkdir(exist_ok=True)
# Temporary files (gloo's file:// rendezvous, inductor caches) stay inside the work tree.
os.environ.setdefault("TMPDIR", str(_TMP))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_TMP / "inductor"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
