"""The allocator setting: applied once on glibc, never over the user's own malloc tuning."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "from auditor.allocator import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def keeps(env: dict[str, str]) -> str:
    """What ``keep_freed_memory`` answers, twice, in a fresh process with ``env`` added."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK], env={**environment, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only")
def test_the_thresholds_are_set_once_on_glibc() -> None:
    assert keeps({}) == "True True"


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
    ],
    ids=["trim", "arena", "tunables"],
)
def test_a_user_who_tuned_malloc_keeps_their_settings(env: dict[str, str]) -> None:
    assert keeps(env) == "False False"
