import os
import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny random checkpoint directory per supported family."""
    from mtpdraft.testing import TINY_CONFIGS, tiny_model_dir

    root = tmp_path_factory.mktemp("tiny")
    return {fam: tiny_model_dir(root / fam, fam) for fam in TINY_CONFIGS}


@pytest.fixture(scope="session")
def real_model_cache():
    """The bundled model is converted once into MTPDRAFT_CACHE (or the default cache)."""
    return os.environ.get("MTPDRAFT_CACHE")
