import atexit
import os
import shutil
import tempfile

import pytest
import torch

# session-scoped real services for the cluster tests (moto S3, MLflow server on S3, 2-node Ray)
from services import mlflow_s3, moto_s3, ray_two_nodes  # noqa: E402,F401

# Tests never touch the network: block hub downloads and keep runs small and repeatable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# The suite's caches (stage 1, reference samples) in a folder of its own, never the user's ~/.cache/sfd;
# the sweeps the tests start inherit it (tests/test_scale.py checks that a sweep leaves $HOME untouched).
os.environ["SFD_CACHE"] = tempfile.mkdtemp(prefix="sfd-test-cache-")
atexit.register(shutil.rmtree, os.environ["SFD_CACHE"], ignore_errors=True)
# One thread: on a shared 2-core machine two spinning threads are several times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from sfd.presets import get_preset
    return get_preset("digits")


@pytest.fixture(scope="session")
def teacher(digits):
    from sfd.denoisers import load_teacher
    return load_teacher(digits)


@pytest.fixture(scope="session")
def judge(digits):
    from sfd.evaluate import load_judge
    return load_judge(digits)
