"""A non-editable install: the wheel carries the C runtime built with the package, and from it the
Python API and the packaged C CLI give the same text from the same seed. (The wheel is installed
into a fresh virtual environment with only what inference needs: numpy, tokenizers, jinja2.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from edgemoe.runtime import REPO_ROOT

SCRIPT = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    import edgemoe
    from edgemoe import runtime
    art = sys.argv[1]
    assert runtime.runtime_dir() == runtime.PACKAGED_DIR, runtime.runtime_dir()
    assert not str(Path(edgemoe.__file__)).startswith(sys.argv[2]), edgemoe.__file__
    with edgemoe.Session(art) as s:
        text = "".join(s.generate("ROMEO:", max_tokens=32, temperature=0.8, seed=1))
    cli = subprocess.run([str(runtime.PACKAGED_DIR / "edgemoe_run"), art, "--prompt", "ROMEO:", "-n", "32",
                          "--temperature", "0.8", "--seed", "1"], capture_output=True, text=True, check=True)
    print(repr(text))
    print(repr(cli.stdout.split(chr(10) + "tokens=")[0]))
""")


def test_an_installed_wheel_runs_the_api_and_the_packaged_cli(artifact_int4, tmp_path):
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-q",
                "-w", str(tmp_path / "dist"))
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("edgemoe-*.whl"))
    assert "linux" in wheel.name  # a platform wheel: it holds machine code
    import zipfile

    packaged = set(zipfile.ZipFile(wheel).namelist())
    for family in (REPO_ROOT / "models" / "families").glob("*/__init__.py"):  # each family folder, unlisted
        assert f"edgemoe/models/families/{family.parent.name}/__init__.py" in packaged, family
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    py = str(venv / "bin" / "python")
    for args in (["numpy", "tokenizers", "jinja2"], ["--no-deps", str(wheel)]):
        proc = run(py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args)
        assert proc.returncode == 0, proc.stderr
    proc = run(py, "-c", SCRIPT, str(artifact_int4), str(REPO_ROOT), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    python_text, cli_text = proc.stdout.splitlines()
    assert python_text == cli_text and len(eval(python_text)) > 20, proc.stdout
