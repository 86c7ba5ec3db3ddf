"""Runs the browser client's unit tests (tests/js/, Node's built-in test runner).

Node is required: CI installs it, so a missing `node` is a failure, not a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = ROOT / "tests" / "js"


def test_js_client() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "`node` is not on PATH: the JS client tests (tests/js/) need Node.js 20+ "
            "(CI installs it; install Node locally to run them)",
            pytrace=False,
        )
    try:
        result = subprocess.run(
            [node, "--test", "tests/js/"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = [o.decode() if isinstance(o, bytes) else o for o in (exc.stdout, exc.stderr) if o]
        pytest.fail("`node --test tests/js/` timed out after 60 s\n" + "\n".join(output))
    if result.returncode != 0:
        print(result.stdout)
        print(result.stderr)
    assert result.returncode == 0, (
        f"`node --test tests/js/` exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
