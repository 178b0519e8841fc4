"""Shared fixtures: tiny original-format checkpoints of both families, built once per session."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("D2F_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory of a tiny checkpoint, by family: tiny_dir("llada") / tiny_dir("dream")."""
    from d2f.tiny import write_tiny_checkpoint

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{family}"), family)
        return made[family]

    return get


@pytest.fixture(params=["llada", "dream"])
def family_name(request):
    return request.param
