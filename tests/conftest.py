import atexit
import os
import secrets
import shutil
import tempfile

import pytest
import torch

# session-scoped real services for the cluster tests (moto S3, MLflow server on S3, 2-node Ray)
from services import mlflow_s3, moto_s3, ray_two_nodes  # noqa: E402,F401

# Tests never touch the network: block hub downloads and keep runs small and repeatable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Nothing in the user's home from a test run (tests/test_scale.py runs sweeps with $HOME empty and checks it
# stays so): the suite's caches (stage 1, reference samples) in a folder of its own, not ~/.cache/sfd;
# matplotlib's font cache there too, not ~/.cache/matplotlib; a local Ray's token from the environment
# instead of one it would write to ~/.ray/auth_token. The sweeps the tests start inherit all three.
_SCRATCH = tempfile.mkdtemp(prefix="sfd-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ["SFD_CACHE"] = os.path.join(_SCRATCH, "cache")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_SCRATCH, "matplotlib"))
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
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
