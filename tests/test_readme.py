"""The README's first example must run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    pytest.importorskip("torchvision")
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    selector = namespace["selector"]
    assert selector.num_steps == 3 and sum(selector.counts) == 3
