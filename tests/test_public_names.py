"""The public names stay where they were: every name without a leading underscore that a module of gpconv
defined before the restructure into packages (issue 26; ``tests/public_names.json``, read from the sources at
commit f9b4415) still imports from that module's dotted path, now that the code lives in smaller modules."""

import importlib
import json

import pytest

from conftest import ROOT

PUBLIC = json.loads((ROOT / "tests" / "public_names.json").read_text())


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_public_name_still_imports_from_its_old_path(module):
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:  # an extra that is not installed here
        pytest.skip(f"{module}: {error}")
    assert [name for name in PUBLIC[module] if not hasattr(loaded, name)] == []
