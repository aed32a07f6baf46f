"""Names: our kernels are gorilla_dist.kernels, and nothing the checkout puts on sys.path shadows a dependency.

pytest and `python -m ...` from the checkout root put the root (and, for pytest, tests/ and benchmarks/:
pyproject's `pythonpath`) first on sys.path, so a top-level module or package there with the name of an
installed one wins over the installed one. That broke transformers once: it imports Hugging Face's
`kernels`, and our attention kernels were a top-level `kernels/` package.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ON_PATH = (REPO, REPO / "tests", REPO / "benchmarks")
"""Folders on sys.path when the suite or a tool runs from the checkout root."""


def top_level_names(folder: Path) -> set[str]:
    """What `import NAME` would find in this folder: modules, packages, and folders (namespace portions)."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names


def test_kernels_import_resolves_to_this_repo():
    import gorilla_dist.kernels as k

    assert Path(k.__file__).resolve() == REPO / "gorilla_dist" / "kernels" / "__init__.py"
    assert k.core_attention_spec.__module__ == "gorilla_dist.kernels"


def test_no_name_on_the_checkouts_path_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    assert "torch" in installed and "deepspeed" in installed  # the scan looks at something
    ours = {"gorilla_dist", "launcher"}  # this checkout's own (editable) distribution
    clashes = {f"{folder.relative_to(REPO) if folder != REPO else '.'}/{name}": installed[name]
               for folder in ON_PATH for name in sorted(top_level_names(folder) - ours) if name in installed}
    assert not clashes, f"these names in the checkout shadow installed packages: {clashes}"


def test_the_scan_sees_a_clash(tmp_path):
    """The check above on a folder that does shadow: a `kernels/` package and a `yaml.py` module."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    installed = importlib.metadata.packages_distributions()
    assert {n for n in top_level_names(tmp_path) if n in installed} >= {"yaml"} | ({"kernels"} & set(installed))


def test_transformers_imports_hugging_faces_kernels_from_the_checkout_root():
    """`python -c` from the root puts the root first on sys.path, as `python -m launcher` and pytest do."""
    code = ("import sys; assert sys.path[0] == '', sys.path[0]\n"
            "import transformers.integrations.hub_kernels\n"
            "import importlib.util as u\n"
            "spec = u.find_spec('kernels'); print(spec.origin if spec else None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip().splitlines()[-1]
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert origin == "None"  # nothing named kernels anywhere: not installed, and none of ours
    else:
        assert Path(origin).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
