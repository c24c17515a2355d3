"""What a test module needs that a developer's machine may lack: skipped there, a failure under CI.

CI (the `CI` environment variable set, as every CI service does) installs `.[cpu,torch,dev]`, so a missing piece
there is a broken install or build, not an optional extra: the run must fail rather than quietly skip the tests.
"""

from __future__ import annotations

import os

import pytest


def require(missing: str | None) -> None:
    """At a test module's top: `missing` is None when what it needs is there, else the reason it is not."""
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{missing} (CI is set: these tests must run, not skip)", pytrace=False)
    pytest.skip(missing, allow_module_level=True)
