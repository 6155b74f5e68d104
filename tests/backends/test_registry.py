"""SPEC section 6: choosing a backend; plugins through the ``tensortap.backends`` entry points.

Plugins are real distributions: a ``*.dist-info`` folder with
``entry_points.txt`` next to a module, on a folder added to ``sys.path``,
found by :mod:`importlib.metadata` as an installed package would be.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import cli, strict_json

import tensortap
from tensortap import StorageOptionsError
from tensortap.backends import ENTRY_POINT_GROUP, FsspecStorage, LocalStorage, get_storage
from tensortap.backends.registry import list_backends, plugin_schemes
from tensortap.capture import Writer

PLUGIN_SOURCE = '''
from tensortap.backends import LocalStorage


class DirStorage(LocalStorage):
    """<scheme>://<path>: a local directory, reached through a plugin."""

    def __init__(self, url, **options):
        super().__init__(url.partition("://")[2])
        self.url = url
        self.options = options


class StrictStorage(DirStorage):
    """<scheme>://<path>, whose one option is required."""

    def __init__(self, url, region):
        super().__init__(url, region=region)


class NotAStorage:
    pass
'''


def install_distribution(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, entry_points: dict[str, str], source: str = PLUGIN_SOURCE
) -> str:
    """Create a distribution on a new ``sys.path`` folder; return its module's name.

    ``entry_points`` maps a scheme to ``"{module}:Object"`` (``{module}`` is filled in).
    """
    module = f"tt_plugin_{uuid.uuid4().hex[:12]}"
    site = tmp_path / "site"
    dist_info = site / f"{module}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = "".join(f"{scheme} = {target.format(module=module)}\n" for scheme, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    return module


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A working plugin for ``tapdir://``; returns its module name."""
    return install_distribution(monkeypatch, tmp_path, {"tapdir": "{module}:DirStorage"})


def test_plugin_scheme_maps_to_the_plugin_class(plugin: str, tmp_path: Path) -> None:
    assert "tapdir" in plugin_schemes()
    storage = get_storage(f"tapdir://{tmp_path}/trial", region="eu")
    assert type(storage).__name__ == "DirStorage"
    assert type(storage).__module__ == plugin
    assert storage.url == f"tapdir://{tmp_path}/trial"
    assert storage.options == {"region": "eu"}
    assert list_backends()["tapdir"] is type(storage)


def test_plugin_serves_a_whole_trial(plugin: str, tmp_path: Path) -> None:
    url = f"tapdir://{tmp_path}/trial"
    with Writer(url) as writer:
        for step in range(3):
            with writer.stepping():
                writer.save("dense/kernel", np.full(4, step, dtype=np.float32), collections=["weights"])
    assert (tmp_path / "trial" / "end" / "worker_0.json").is_file()
    trial = tensortap.create_trial(url)
    assert type(trial.storage).__name__ == "DirStorage"
    assert trial.steps() == [0, 1, 2]
    np.testing.assert_array_equal(trial.tensor("dense/kernel").value(2), np.full(4, 2, dtype=np.float32))


def test_plugin_takes_precedence_over_fsspec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install_distribution(monkeypatch, tmp_path, {"memory": "{module}:DirStorage"})
    assert type(get_storage(f"memory://{tmp_path}/trial")).__name__ == "DirStorage"


def test_broken_plugins_warn_and_are_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install_distribution(
        monkeypatch,
        tmp_path,
        {
            "tapdir": "{module}:DirStorage",
            "tapgone": "{module}_missing_module:Storage",
            "tapwrong": "{module}:NotAStorage",
        },
    )
    found = list_backends()
    messages = [r.getMessage() for r in caplog.records if r.name == "tensortap" and r.levelname == "WARNING"]
    assert sorted(found) == ["tapdir"]
    assert any("'tapgone'" in m and "failed to load" in m and "ModuleNotFoundError" in m for m in messages), messages
    assert any("'tapwrong'" in m and "subclass of tensortap.backends.Storage" in m for m in messages), messages
    caplog.clear()
    assert type(get_storage(f"tapdir://{tmp_path}/trial")).__name__ == "DirStorage"
    assert isinstance(get_storage(f"memory://tensortap-{uuid.uuid4().hex}"), FsspecStorage)
    assert not caplog.records  # the working plugin loads without touching the broken ones
    with pytest.raises(ValueError, match="the plugin registered for tapgone:// cannot be used: 'tapgone'"):
        get_storage("tapgone://x")
    assert "'tapgone'" in caplog.text


@pytest.mark.parametrize(
    ("scheme", "target", "why"),
    [
        ("tapgone", "{module}_missing_module:Storage", "failed to load: ModuleNotFoundError"),
        ("tapwrong", "{module}:NotAStorage", "expected a subclass of tensortap.backends.Storage"),
    ],
)
def test_a_scheme_whose_plugin_cannot_be_used_says_so_and_is_not_offered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str, target: str, why: str
) -> None:
    """The URL of a plugin that failed to load was called an unknown scheme, in a message that listed that
    very scheme as valid."""
    module = install_distribution(monkeypatch, tmp_path, {"tapdir": "{module}:DirStorage", scheme: target})
    with pytest.raises(ValueError) as info:
        get_storage(f"{scheme}://bucket/run")
    message = str(info.value)
    assert message.startswith(f"storage URL '{scheme}://bucket/run': the plugin registered for {scheme}:// cannot ")
    assert f"'{scheme}' ({target.format(module=module)}, from {module} 1.0) {why}" in message
    assert "unknown scheme" not in message
    with pytest.raises(ValueError) as info:
        get_storage("nosuchscheme://bucket/run")
    valid, _, broken = str(info.value).partition("; registered but failing to load: ")
    assert "tapdir://" in valid and f"{scheme}://" not in valid
    assert broken.startswith(f"{scheme}://)")


def test_unknown_scheme_lists_the_valid_choices(plugin: str) -> None:
    with pytest.raises(ValueError) as info:
        get_storage("nosuchscheme://bucket/run")
    message = str(info.value)
    assert "'nosuchscheme://bucket/run'" in message
    assert "unknown scheme 'nosuchscheme'" in message
    for choice in ("a local path", "file://", "tapdir://", "s3", "memory", "gcs"):
        assert choice in message


def test_unknown_scheme_inside_a_chained_url() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'nosuchscheme'"):
        get_storage("simplecache::nosuchscheme://bucket/run")


@pytest.mark.parametrize(("scheme", "package"), [("gs", "gcsfs"), ("az", "adlfs")])
def test_missing_optional_dependency_gives_an_install_hint(scheme: str, package: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(ImportError, match=f"{scheme}:// needs the package {package}.*pip install {package}"):
        get_storage(f"{scheme}://bucket/run")
    with pytest.raises(ImportError, match=f"pip install {package}"):
        Writer(f"{scheme}://bucket/run")


def test_local_paths_and_file_urls(tmp_path: Path) -> None:
    assert isinstance(get_storage(str(tmp_path)), LocalStorage)
    assert isinstance(get_storage(tmp_path), LocalStorage)
    storage = get_storage(f"file://{tmp_path}/x")
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "x"


def test_a_ready_storage_is_returned_as_is(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert get_storage(storage) is storage
    with pytest.raises(ValueError, match="storage_options"):
        get_storage(storage, anon=True)


def test_storage_options_for_a_local_path_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"storage_options: .*\['anon'\].*local path"):
        get_storage(tmp_path, anon=True)


def test_fsspec_urls_go_to_fsspec() -> None:
    storage = get_storage(f"memory://tensortap-{uuid.uuid4().hex}/run")
    assert isinstance(storage, FsspecStorage)
    assert storage.root.endswith("/run")


def test_no_plugin_module_is_imported_until_its_scheme_is_used(plugin: str, tmp_path: Path) -> None:
    get_storage(tmp_path)
    get_storage(f"memory://tensortap-{uuid.uuid4().hex}")
    assert "tapdir" in plugin_schemes()
    assert plugin not in sys.modules
    get_storage(f"tapdir://{tmp_path}")
    assert plugin in sys.modules


def test_a_scheme_registered_by_two_distributions_warns_once_naming_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first plugin found served the scheme, without a word about the other."""
    used = install_distribution(monkeypatch, tmp_path / "a", {"tapdup": "{module}:DirStorage"})
    broken = install_distribution(monkeypatch, tmp_path / "b", {"tapdup": "{module}:NotAStorage"})  # first on sys.path
    for _ in range(2):
        assert type(get_storage(f"tapdup://{tmp_path}/trial")).__module__ == used
        assert list_backends()["tapdup"].__module__ == used
    shared = [r.getMessage() for r in caplog.records if "registered by" in r.getMessage()]
    assert shared == [
        f"tensortap backend scheme tapdup:// is registered by 2 plugins: 'tapdup' ({broken}:NotAStorage, from "
        f"{broken} 1.0); 'tapdup' ({used}:DirStorage, from {used} 1.0); using 'tapdup' ({used}:DirStorage, from "
        f"{used} 1.0) (the first found on sys.path that loads); uninstall the others to silence this"
    ]


def test_storage_options_a_plugin_does_not_take_are_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A plugin's TypeError for a misspelt option was reported by the command line as an unexpected error."""
    module = install_distribution(monkeypatch, tmp_path, {"tapstrict": "{module}:StrictStorage"})
    url = f"tapstrict://{tmp_path}/trial"
    assert get_storage(url, region="eu").options == {"region": "eu"}
    prefix = f"storage URL {url!r}: storage_options"
    plugin = f"do not fit the tapstrict:// plugin {module}.StrictStorage"
    with pytest.raises(StorageOptionsError) as info:
        get_storage(url, regoin="eu")
    assert str(info.value) == f"{prefix} {{'regoin': 'eu'}} {plugin}: unknown option(s) regoin; it takes region"
    with pytest.raises(ValueError, match=f"{plugin}: missing a required argument: 'region'; it takes region"):
        tensortap.create_trial(url)
    path = os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = cli("ls", url, "--storage-options", '{"regoin": "eu"}', "--json", env={"PYTHONPATH": path})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = strict_json(result.stdout)["error"]
    assert (error["kind"], error["message"]) == ("usage", str(info.value))
    assert result.stderr == f"tensortap ls: {info.value}\n"
