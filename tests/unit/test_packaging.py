"""Our kernels ship as gorilla_dist.kernels and never resolve to PyPI's unrelated `kernels`."""

from pathlib import Path


def test_kernels_import_resolves_to_this_repo():
    import gorilla_dist.kernels as k

    assert Path(k.__file__).resolve() == (Path(__file__).resolve().parents[2] / "kernels" / "__init__.py")
    assert k.core_attention_spec.__module__ == "gorilla_dist.kernels"
