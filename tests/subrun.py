"""Run some tests of a file in a fresh process (another environment: another kernel build) and read
what ran from pytest's own JUnit XML report, not from its printed summary."""

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def run_tests(path: str, selection: str, env: dict) -> tuple[list[str], str]:
    """Run the tests of ``path`` that ``-k selection`` picks; returns the names of those that passed
    (a failed, skipped or erroring one makes the list shorter than what ran) and the output."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", selection,
             f"--junitxml={report}"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
        )
        cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
        passed = [case.get("name") for case in cases if not len(case)]  # a failure/skip/error is a child element
    return passed, result.stdout[-3000:] + result.stderr[-2000:]
