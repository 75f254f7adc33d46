import os

# Tests run on CPU; keep XLA from grabbing every core for intra-op threads twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from ngdiff_jax.paths import shared_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    d = shared_data_dir()
    if not (d / "tofu" / "full.json").exists():
        raise FileNotFoundError(
            f"benchmark data not found at {d}: put the shared folder beside the repo "
            "(../shared/data) or set NGDIFF_SHARED_DATA"
        )
    return d


@pytest.fixture(scope="session")
def tofu_dir(shared_data):
    return shared_data / "tofu"


@pytest.fixture(scope="session")
def muse_news_dir(shared_data):
    return shared_data / "muse_news"
