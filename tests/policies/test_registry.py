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


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", ".hidden", "x" * 65, "demo\n"])
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


# Found by a release audit (/tmp/audit_rel): numbering, damaged files and concurrent alias moves.


def _in_thread(fn, timeout=20.0):
    """Run `fn` in a daemon thread; fail (not hang the suite) if it is still running after `timeout` s."""
    import threading

    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s (looping or deadlocked)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_stray_file_named_like_the_next_version_is_skipped_not_retried_for_ever(tmp_path):
    _register(tmp_path)
    (tmp_path / "demo" / "2").write_text("left by a sync tool")
    assert _in_thread(lambda: _register(tmp_path, alias=None)).version == 3
    assert versions(tmp_path, "demo") == [1, 3]
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(".staging")]


def test_a_rename_that_fails_for_another_reason_is_a_registry_error(tmp_path, monkeypatch):
    from pathlib import Path

    def refuse(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(RegistryError, match="cannot move the new version into .*/demo/1"):
        _in_thread(lambda: _register(tmp_path))


def test_registering_gives_up_after_a_bounded_number_of_lost_races(tmp_path, monkeypatch):
    from policies import registry

    _register(tmp_path)
    monkeypatch.setattr(registry, "_highest_used", lambda root, name: 0)  # every try targets the taken "1"
    with pytest.raises(RegistryError, match=f"{registry.REGISTER_ATTEMPTS} version numbers in a row were taken"):
        _in_thread(lambda: _register(tmp_path))


def test_a_version_deleted_by_hand_is_never_renumbered_and_its_alias_fails_cleanly(tmp_path):
    import shutil

    from policies.registry import version_of

    _register(tmp_path), _register(tmp_path)  # production → 2
    shutil.rmtree(tmp_path / "demo" / "2")
    for read in (version_of, resolve):
        with pytest.raises(RegistryError, match=r"demo@production points at version 2, whose folder .* is missing"):
            read(tmp_path, "demo@production")
    assert _register(tmp_path, alias=None).version == 3  # not 2: production must not start serving it
    with pytest.raises(RegistryError, match="is missing"):
        resolve(tmp_path, "demo")


def test_a_number_only_the_promotion_history_remembers_is_not_reused(tmp_path):
    import shutil

    from policies.audit_log import ReleaseEvidence, record_move, record_release, verify

    for _ in range(2):
        record_release(tmp_path, _register(tmp_path, alias=None), "production", ReleaseEvidence(snapshot_id="s"))
    record_move(tmp_path, "demo", "production", 1, why="rollback")  # no alias names 2 any more
    shutil.rmtree(tmp_path / "demo" / "2")
    assert _register(tmp_path, alias=None).version == 3
    assert [e.version for e in verify(tmp_path)] == [1, 2, 1]  # the log's v2 still means the deleted model


def test_a_lineage_file_gone_from_a_version_is_a_registry_error(tmp_path):
    _register(tmp_path)
    (tmp_path / "demo" / "1" / "lineage.json").unlink()
    with pytest.raises(RegistryError, match="cannot read .*lineage.json"):
        resolve(tmp_path, "demo@1")


@pytest.mark.parametrize(("content", "problem"), [
    ("", "cannot be read as JSON"), ("{not json", "cannot be read as JSON"), ("[]", r"holds \[\], not a JSON object"),
    ("null", "holds null, not a JSON object"), ('{"production": "abc"}', "not version numbers: {'production': 'abc'}"),
    ('{"production": true}', "not version numbers"), ('{"production": -1}', "not version numbers"),
])
def test_a_damaged_aliases_file_is_a_registry_error_naming_the_file(tmp_path, content, problem):
    _register(tmp_path)
    (tmp_path / "demo" / "aliases.json").write_text(content)
    for read in (lambda: aliases(tmp_path, "demo"), lambda: resolve(tmp_path, "demo@production"),
                 lambda: set_alias(tmp_path, "demo", "production", 1)):
        with pytest.raises(RegistryError, match=f"demo/aliases.json (.* )?{problem}"):
            read()
    assert (tmp_path / "demo" / "aliases.json").read_text() == content  # not overwritten on top of the damage


def test_concurrent_alias_moves_are_not_lost(tmp_path, monkeypatch):
    """Each move reads aliases.json, changes one key and writes it back; the write is slowed so that without the
    lock every thread reads before any writes, and all but one move would be lost."""
    import threading
    import time

    from policies import registry

    n = 8
    for _ in range(n):
        _register(tmp_path, alias=None)
    write = registry._write_json_atomic

    def slow_write(path, content):
        time.sleep(0.05)
        write(path, content)

    monkeypatch.setattr(registry, "_write_json_atomic", slow_write)
    start = threading.Barrier(n)

    def move(i):
        start.wait()
        set_alias(tmp_path, "demo", f"a{i}", i + 1)

    threads = [threading.Thread(target=move, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert aliases(tmp_path, "demo") == {f"a{i}": i + 1 for i in range(n)}


def test_concurrent_registers_with_an_alias_keep_every_alias_and_number(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda i: _register(tmp_path, alias=f"a{i}").version, range(16)))
    assert sorted(made) == list(range(1, 17))
    assert aliases(tmp_path, "demo") == {f"a{i}": v for i, v in enumerate(made)}


def test_moving_an_alias_while_holding_the_registry_lock_does_not_deadlock(tmp_path):
    from policies.registry_lock import exclusive as _exclusive

    _register(tmp_path), _register(tmp_path)

    def nested():
        with _exclusive(tmp_path), _exclusive(tmp_path):
            set_alias(tmp_path, "demo", "production", 1)

    _in_thread(nested, timeout=10)
    assert aliases(tmp_path, "demo") == {"production": 1}
