"""The daemon's memory policy."""

from __future__ import annotations

import gc

from agent.memory import FULL_COLLECTION_EVERY, collect_less_often


def test_full_collections_are_made_rarer_and_the_rest_is_kept() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        collect_less_often()
        assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY) == (700, 10, 100)
    finally:
        gc.set_threshold(*before)
