import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``get(family)``: the directory of a tiny random checkpoint of ``family`` (built once per session, no
    downloads); skips the test when the installed transformers cannot build the family. Building leaves torch's
    random state as it was, so a test draws the same numbers whether or not its family was built already."""
    from acrl.backends.hf import tiny

    root = tmp_path_factory.mktemp("hf-tiny")
    cache = {}

    def get(family):
        if tiny.unavailable(family):
            pytest.skip(tiny.unavailable(family))
        if family not in cache:
            with torch.random.fork_rng(devices=[]):
                cache[family] = tiny.make_tiny(family, str(root / family), seed=0)
        return cache[family]

    return get
