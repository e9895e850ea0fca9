import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("FXPP_HYPOTHESIS_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("default")


import pytest


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """``fxpp run --data`` caches its tokenized corpus (fxpp.trainer.corpus) in a session directory, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXPP_DATA_CACHE", str(tmp_path_factory.mktemp("fxpp-data-cache")))
        yield
