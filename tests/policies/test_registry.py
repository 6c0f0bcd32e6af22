import pytest
import torch

from policies.registry import RegistryError, aliases, register, resolve, set_alias, validate_name, versions


def _register(root, **kw):
    return register(root, "demo", {"w": torch.ones(2)}, {"family": "direct"}, {"snapshot": "abc"}, **kw)


def test_versions_are_numbered_and_alias_moves(tmp_path):
    first, second = _register(tmp_path), _register(tmp_path)
    assert (first.version, second.version) == (1, 2)
    assert resolve(tmp_path, "demo@production").version == 2
    set_alias(tmp_path, "demo", "production", 1)  # rollback
    assert resolve(tmp_path, "demo").version == 1
    assert resolve(tmp_path, "demo@2").lineage["snapshot"] == "abc"
    assert versions(tmp_path, "demo") == [1, 2]


def test_release_without_alias_leaves_alias_alone(tmp_path):
    _register(tmp_path)
    _register(tmp_path, alias=None)
    assert aliases(tmp_path, "demo") == {"production": 1}


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", ".hidden", "x" * 65])
def test_names_that_could_escape_the_root_are_refused(name):
    with pytest.raises(RegistryError):
        validate_name(name)


def test_unknown_alias_and_version_explain_what_exists(tmp_path):
    _register(tmp_path)
    with pytest.raises(RegistryError, match="known aliases"):
        resolve(tmp_path, "demo@staging")
    with pytest.raises(RegistryError, match="known"):
        resolve(tmp_path, "demo@7")
