"""Fixtures of the data tests: the tiny demo dataset, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from meduet.data.demo import DemoSummary
from tests.data.tiny_demo import generate, tiny_config


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    """``(demo root, summary)`` of ``tiny_config()``; shared, so read it, never change it."""
    out_dir = tmp_path_factory.mktemp("tiny_demo")
    return out_dir, generate(tiny_config(), out_dir)
