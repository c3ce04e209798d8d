"""A user's own `training.py`, `serving/` or `cluster.py` cannot shadow Kiln, nor Kiln theirs
(issue 34). Kiln installs one import name, `kiln`: the cluster/ folder is the package and the
other five folders its subpackages (pyproject's package-dir; docs/design-notes.md).

The slow test is the acceptance run: Kiln built as a wheel and installed (not editable) into a
fresh venv, and a user project folder holding those modules; from that folder `kiln train`
finishes and `from kiln import Kiln` gets Kiln's client while `import training` gets theirs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "cluster": "kiln",
    "actors": "kiln.actors",
    "training": "kiln.training",
    "tuning": "kiln.tuning",
    "serving": "kiln.serving",
    "federated": "kiln.federated",
}


def test_every_package_folder_is_installed_under_kiln() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {name: folder for folder, name in FOLDERS.items()}
    expected = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder)
            expected.add(".".join([name, *rel.parts]))
    assert set(config["packages"]) == expected, "a package folder is missing from pyproject"


def test_importing_a_subpackage_does_not_load_the_client() -> None:
    """`kiln`'s exports are lazy (PEP 562): a Ray worker importing kiln.training.lm does not
    import the client, httpx or the CLI."""
    probe = (
        "import sys, kiln.training.errors; "
        "print(sorted(m for m in ('kiln.client', 'kiln.cli', 'httpx') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    assert done.stdout.strip() == "[]"
    exports = (
        "import kiln; from kiln import Kiln, KilnError, NotFoundError; "
        "print(Kiln.__module__, KilnError.__module__, kiln.__version__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", exports], capture_output=True, text=True, check=True, cwd="/"
    )
    module, errors, version = done.stdout.split()
    assert (module, errors) == ("kiln.client", "kiln.training.errors")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version)


USER_FILES = {
    "training.py": "WHOSE = 'user training'\n",
    "serving/__init__.py": "WHOSE = 'user serving'\n",
    "cluster.py": "WHOSE = 'user cluster'\n",
    "actors.py": "raise SystemExit('a user script, not a module to import')\n",
}


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with Kiln's wheel (not editable) and no copy of the checkout on its path.

    Its dependencies come from this environment's site-packages, added by a .pth line (a
    path entry, whose own .pth files, this checkout's editable finder among them, are not
    run): a fresh resolve of torch and Ray would download gigabytes for the same packages.
    """
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = work.glob("kiln_maas-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return venv


def user_project(base: Path) -> Path:
    project = base / "project"
    for name, text in USER_FILES.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return project


def user_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST", "PYTHON"))}
    env.update(KILN_HOME=str(project / ".kiln"), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_a_user_project_with_its_own_training_module_trains(
    wheel_venv: Path, tmp_path: Path
) -> None:
    project = user_project(tmp_path)
    env = user_env(project)
    python = wheel_venv / "bin" / "python"
    probe = (
        "import kiln, training, serving, cluster; from kiln import Kiln; "
        "print(kiln.__file__); print(Kiln.__module__); "
        "print(training.WHOSE); print(serving.WHOSE); print(cluster.WHOSE)"
    )
    done = subprocess.run(
        [str(python), "-c", probe], cwd=project, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    where, module, *users = done.stdout.split("\n")[:5]
    assert "site-packages" in where and str(ROOT) not in where  # the wheel, not the checkout
    assert module == "kiln.client"
    assert users == ["user training", "user serving", "user cluster"]

    # Ray puts the driver's folder on its workers' path: they import kiln.*, never training.
    train = subprocess.run(
        [
            str(wheel_venv / "bin" / "kiln"),
            "train",
            "--data",
            "sklearn:iris",
            "--model",
            "mlp",
            "--epochs",
            "2",
            "--json",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, f"{train.stdout}\n{train.stderr}"
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert result["model"] == "sklearn-iris-mlp" and result["version"] >= 1
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert "restarted" not in train.stderr
