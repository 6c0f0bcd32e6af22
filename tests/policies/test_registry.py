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


def _two_stage_version(tmp_path, drop=(), format_version=None):
    import json

    from policies.features.model import TwoStageConfig, TwoStagePolicy

    config = TwoStageConfig()
    tensors = {k: v for k, v in TwoStagePolicy(config).state_dict().items() if k not in drop}
    version = register(tmp_path, "p", tensors, {"family": "two_stage", "model": config.to_dict()}, {})
    if format_version is not None:
        path = tmp_path / "p" / str(version.version) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": format_version}))
    return version


def test_a_release_names_its_registry_format_and_loads(tmp_path):
    import json

    from policies.loader import load
    from policies.registry import REGISTRY_FORMAT

    version = _two_stage_version(tmp_path)
    assert json.loads((tmp_path / "p" / "1" / "config.json").read_text())["format_version"] == REGISTRY_FORMAT
    assert load("p@1", root=tmp_path).version == version


def test_a_version_from_an_older_or_newer_format_fails_with_a_message_naming_it(tmp_path):
    from policies.loader import load
    from policies.registry import RegistryFormatError

    _two_stage_version(tmp_path, drop=("adapter.centre_weight", "adapter.centre_bias"))
    with pytest.raises(RegistryFormatError, match=r"registry format 1 \(its weights lack adapter.centre_bias, "
                                                  r"adapter.centre_weight\); this proxyloop reads format 2"):
        load("p@1", root=tmp_path)
    _two_stage_version(tmp_path, format_version=3)
    with pytest.raises(RegistryFormatError, match="registry format 3; this proxyloop reads formats up to 2"):
        load("p@2", root=tmp_path)
