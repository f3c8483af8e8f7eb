"""Packaging: the licence is shipped, and CI runs the README's test command."""

import hashlib
import pathlib
import subprocess
import sys
import zipfile

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10.
    tomllib = None

REPO = pathlib.Path(__file__).resolve().parents[1]
# MD5 of the Apache License 2.0 text as published at
# https://www.apache.org/licenses/LICENSE-2.0.txt.
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def test_license_file_is_apache_2_and_declared():
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.md5(text).hexdigest() == APACHE_2_MD5
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


@pytest.mark.slow
def test_wheel_ships_the_license(tmp_path):
    """Builds the wheel (pip fetches the build backend) and reads it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    str(REPO), "-w", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("flax_minrnn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        licenses = [n for n in z.namelist() if n.endswith("licenses/LICENSE")]
        assert len(licenses) == 1
        assert hashlib.md5(z.read(licenses[0])).hexdigest() == APACHE_2_MD5
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    assert "License-Expression: Apache-2.0" in lines
    assert "License-File: LICENSE" in lines


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs the README's second command (pip's ``-q`` aside)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    readme_tests = commands[1].split(" && ", 2)[2]  # after the venv's creation and activation
    ci = [line for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.startswith("pip install")]
    assert len(ci) == 1, ci
    assert ci[0].replace("pip install -q ", "pip install ") == readme_tests
