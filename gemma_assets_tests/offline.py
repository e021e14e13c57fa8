"""The Hugging Face hub client of this test process made offline."""

from __future__ import annotations

from pathlib import Path

import pytest


def offline_cache(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    """The hub client reads `hub_cache` and never the network. It reads HF_HUB_CACHE and
    HF_HUB_OFFLINE once, when first imported, so its constants are set as well as the variables
    (with the variable alone, a process that imported it before retries the unreachable hub with
    backoff: 47 s per call)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
