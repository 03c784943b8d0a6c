"""The C runtime's own unit tests (ctest), run from pytest so one command runs everything."""
import subprocess

from edgemoe.runtime import DEFAULT_BUILD_DIR


def test_ctest(runtime_lib):
    proc = subprocess.run(["ctest", "--output-on-failure"], cwd=DEFAULT_BUILD_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100% tests passed" in proc.stdout
