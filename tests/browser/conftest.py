"""The browser test runs only through `make test-browser` (it needs Chromium and minutes)."""

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GPT2_COURSE_BROWSER_TEST") == "1":
        return
    skip = pytest.mark.skip(reason="the browser test runs with `make test-browser`")
    for item in items:
        if "tests/browser/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(skip)
