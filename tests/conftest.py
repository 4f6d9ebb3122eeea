import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a machine without it they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
