"""The glibc malloc settings: applied where glibc is, the operator's own win."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _run(env: dict[str, str]) -> str:
    code = textwrap.dedent(
        """
        from lockgate.allocator import tune_malloc
        print(sorted(tune_malloc()))
        """
    )
    # A fresh process: mallopt changes the process for good.
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_settings_applied_unless_the_environment_sets_them() -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    assert _run(base) == "['MALLOC_ARENA_MAX']"
    assert _run({**base, "MALLOC_ARENA_MAX": "4"}) == "[]"
