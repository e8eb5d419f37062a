"""Packaging: the wheel installs one namespace ``routezoo`` (never top-level ``layers`` or
``training``), works from a fresh virtual environment, and the editable install points at
the checkout."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = ("routezoo.layers", "routezoo.zoo", "routezoo.training", "routezoo.configs")
REQUIRED_FILES = ("routezoo/layers/__init__.py", "routezoo/zoo/__init__.py",
                  "routezoo/training/__init__.py", "routezoo/configs/default.py")
# What never goes into the copy the wheel is built from (build outputs, environments).
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                      "__pycache__", ".pytest_cache", "runs", ".whl", "*.pyc")

# A dependency-free, offline, quiet pip.
_PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_NO_CACHE_DIR": "1"}


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(_PIP_ENV, JAX_PLATFORMS="cpu", **extra)
    return env


def _run(cmd, cwd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def _check_build_backend() -> None:
    """``--no-build-isolation`` builds with this environment's setuptools, which must be able
    to make wheels: setuptools >= 70.1 has ``bdist_wheel`` built in, older needs ``wheel``."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is not installed: add 'setuptools>=70.1' to the 'test' extra", pytrace=False)
    import setuptools
    version = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.fail(f"setuptools {setuptools.__version__} cannot build wheels without the 'wheel' "
                    "package: add 'setuptools>=70.1' to the 'test' extra", pytrace=False)


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory) -> str:
    """Builds the wheel from a clean copy of the checkout (pip builds in the source tree:
    a copy keeps ``build/`` out of the checkout and stale build outputs out of the wheel)."""
    _check_build_backend()
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(REPO_ROOT, src, ignore=_NOT_SOURCES)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
         cwd=str(tmp))
    wheels = list(out.glob("routezoo-*.whl"))
    assert len(wheels) == 1, wheels
    return str(wheels[0])


def test_wheel_contents(wheel_path):
    names = zipfile.ZipFile(wheel_path).namelist()
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    version = os.path.basename(wheel_path).split("-")[1]
    assert {n.split("/")[0] for n in dist_info} == {f"routezoo-{version}.dist-info"}
    outside = [n for n in names if n not in dist_info and not n.startswith("routezoo/")]
    assert not outside, f"files outside routezoo/ in the wheel: {outside}"
    for required in REQUIRED_FILES:
        assert required in names, f"{required} missing from the wheel"
    assert not any(n.startswith(("layers/", "training/", "zoo/", "configs/")) for n in names)
    # routezoo itself is an implicit namespace package.
    assert "routezoo/__init__.py" not in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    entry_points = zipfile.ZipFile(wheel_path).read(
        next(n for n in dist_info if n.endswith("entry_points.txt"))).decode()
    assert "routezoo = routezoo.training.cli:main" in entry_points


def test_wheel_in_fresh_venv(wheel_path, tmp_path):
    """The wheel's copy (not the checkout) is what a fresh environment imports and runs."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp_path))
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", wheel_path],
         cwd=str(tmp_path))

    # Dependencies: this environment's site-packages, added by a .pth line. A .pth line does
    # not process that dir's own .pth files, so its editable-install finder stays inactive.
    fresh_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=str(tmp_path)).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(fresh_site, "_routezoo_test_deps.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")

    probe = ("import json, " + ", ".join(SUBPACKAGES) + ", routezoo; print(json.dumps({"
             + ", ".join(f"{m!r}: {m}.__file__" for m in SUBPACKAGES)
             + ", 'routezoo': list(routezoo.__path__)}))")
    files = json.loads(_run([str(python), "-c", probe], cwd=str(tmp_path)).stdout.strip().splitlines()[-1])
    venv_real = os.path.realpath(venv)
    for name, path in files.items():
        for p in (path if isinstance(path, list) else [path]):
            assert os.path.realpath(p).startswith(venv_real + os.sep), f"{name} imported from {p}, not the fresh venv"

    cli = bindir / ("routezoo.exe" if os.name == "nt" else "routezoo")
    assert cli.exists(), "the wheel installed no 'routezoo' console script"
    out = _run([str(cli), "--help"], cwd=str(tmp_path))
    text = out.stdout + out.stderr
    assert "train" in text and "default" in text, text


def test_editable_install_points_at_checkout(tmp_path):
    """In this environment (``pip install -e .``) the subpackages come from the checkout's
    folders. Run in a clean process from outside the checkout, so only the install counts."""
    probe = ("import json, " + ", ".join(SUBPACKAGES) + "; print(json.dumps({"
             + ", ".join(f"{m!r}: {m}.__file__" for m in SUBPACKAGES) + "}))")
    files = json.loads(_run([sys.executable, "-c", probe], cwd=str(tmp_path)).stdout.strip().splitlines()[-1])
    root = os.path.realpath(REPO_ROOT)
    for name, path in files.items():
        folder = name.split(".")[1]
        assert os.path.realpath(path) == os.path.join(root, folder, "__init__.py"), f"{name} imported from {path}"


def test_every_subpackage_is_listed_for_the_wheel():
    """Each folder of the five source trees that holds an ``__init__.py`` is a package the
    wheel must carry: ``pyproject.toml`` lists it (a missing entry installs a wheel that
    fails on import)."""
    import tomllib
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("layers", "zoo", "training", "configs", "nnx"):
        for dirpath, _, names in os.walk(os.path.join(REPO_ROOT, top)):
            if "__init__.py" in names and "__pycache__" not in dirpath:
                found.add("routezoo." + os.path.relpath(dirpath, REPO_ROOT).replace(os.sep, "."))
    assert found == listed, f"missing from pyproject.toml: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_accelerator_extras_resolve(tmp_path):
    """``pip install routezoo[cuda]`` and ``routezoo[tpu]`` resolve against the package index
    to jax's CUDA plugin and libtpu at the version of the jax they come with (a dry run:
    nothing is installed). Packages this environment already holds at versions that meet
    the extras stay as they are (pip leaves them out of its report), so the resolved set is
    the installed one updated by the report."""
    from importlib import metadata

    from packaging.requirements import Requirement

    report = tmp_path / "report.json"
    _run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
          "--report", str(report), REPO_ROOT + "[cuda,tpu]"], cwd=str(tmp_path))

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    install = {norm(i["metadata"]["name"]): i["metadata"]["version"]
               for i in json.loads(report.read_text())["install"]}
    resolved = {norm(d.metadata["Name"]): d.version for d in metadata.distributions()} | install
    assert "libtpu" in resolved, sorted(install)
    if "jax" not in install:   # the installed jax stays: its own tpu extra pins libtpu
        pins = [Requirement(r) for r in metadata.requires("jax") or ()]
        pins = [r for r in pins if norm(r.name) == "libtpu" and r.marker and r.marker.evaluate({"extra": "tpu"})]
        assert pins and all(r.specifier.contains(resolved["libtpu"], prereleases=True) for r in pins), \
            (resolved["libtpu"], [str(r) for r in pins])
    assert resolved.get("jax-cuda12-plugin") == resolved["jaxlib"], (resolved.get("jax-cuda12-plugin"), resolved["jaxlib"])
    assert resolved.get("jax-cuda12-pjrt") == resolved["jaxlib"], sorted(install)
