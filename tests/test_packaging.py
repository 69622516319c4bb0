"""The wheel: built without setuptools warnings, and shipping every asset and recipe."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_builds_quietly_and_ships_the_assets(tmp_path):
    pytest.importorskip("setuptools")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                            "--no-build-isolation", "-v", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    output = build.stdout + build.stderr
    # setuptools warns about every asset folder when assets are picked up as packages
    assert "absent from the `packages` configuration" not in output
    (wheel,) = tmp_path.glob("peftkit-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "peftkit" / "assets").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert assets and assets <= shipped, assets - shipped
    recipes = {f"peftkit/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.py")}
    assert recipes and recipes <= shipped, recipes - shipped
