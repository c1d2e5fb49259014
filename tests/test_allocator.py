"""The allocator setting: applied once on glibc, never over thresholds the user set."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CHECK = "from auditor.engine.allocator import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


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
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=131072"},
    ],
    ids=["trim", "mmap", "tunables"],
)
def test_a_user_who_set_the_thresholds_keeps_them(env: dict[str, str]) -> None:
    assert keeps(env) == "False False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only")
def test_other_malloc_settings_do_not_stop_it() -> None:
    """``MALLOC_ARENA_MAX`` (common in containers) is no statement about the thresholds."""
    assert keeps({"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) == "True True"
