"""Tiny data made by fixtures; nothing is downloaded."""
from __future__ import annotations

import logging
import warnings

import pytest

from clip_poison.config import WorldConfig
from clip_poison.world import write_world

warnings.filterwarnings("ignore", message="No pretrained weights")
logging.getLogger().setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A 300-pair world with a 60-image eval split (about a second to make)."""
    root = tmp_path_factory.mktemp("world") / "w"
    write_world(WorldConfig(seed=1, n_train=300, n_eval=60), root)
    return root
