"""Hugging Face hub settings shared by the backbones and the objectives."""

from __future__ import annotations

import os


def offline(local_files_only: bool | None) -> bool:
    """``local_files_only`` as given, or implied by ``HF_HUB_OFFLINE`` (1/true/yes/on) when None."""
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no", "off")
