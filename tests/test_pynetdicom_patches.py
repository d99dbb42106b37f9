"""The node's changes to pynetdicom (dicom_node/patches.py): pinned to the upstream source they
were written against, applied only by ``install()``, and deferring to pynetdicom's own settings
and status tables where those exist."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pynetdicom
import pynetdicom.status
import pytest
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.status import code_to_category

from dicom_node import patches, status, uids

ROOT = Path(__file__).resolve().parent.parent


def test_patched_pynetdicom_code_is_what_the_patches_were_written_against():
    changed = patches.changed_upstream()
    assert not changed, (
        "pynetdicom code that dicom_node replaces, wraps or copies has changed; re-check each "
        "before upgrading:\n- " + "\n- ".join(changed)
    )


def test_a_changed_upstream_function_is_named_with_what_to_recheck(monkeypatch):
    pin = patches.PINS[0]
    monkeypatch.setattr(
        patches, "PINS", (patches.Pin(pin.target, "0" * 16, pin.recheck), *patches.PINS[1:])
    )
    (line,) = patches.changed_upstream()
    assert line.startswith(f"{pin.target} changed in pynetdicom {pynetdicom.__version__}")
    assert pin.recheck in line


def test_installed_pynetdicom_is_the_release_the_patches_were_written_for():
    assert pynetdicom.__version__ == patches.PYNETDICOM_VERSION, (
        f"pynetdicom {pynetdicom.__version__} is installed, the patches were written against "
        f"{patches.PYNETDICOM_VERSION}: once the pins hold (or are re-checked), update "
        "PYNETDICOM_VERSION in dicom_node/patches.py and the pin in pyproject.toml"
    )


def test_pyproject_pins_the_minor_release_the_patches_were_written_for():
    text = (ROOT / "pyproject.toml").read_text()
    major, minor, _patch = patches.PYNETDICOM_VERSION.split(".")
    assert f'"pynetdicom>={patches.PYNETDICOM_VERSION},<{major}.{int(minor) + 1}"' in text


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- what install() changes, and nothing else does ------------------------------------------
# Run in a fresh interpreter: every pynetdicom library module is imported first, then the
# attributes of each module and of each class defined there (and the items of the dicts,
# lists and tuples they hold, two levels deep) are taken, by identity, before and after each
# step: importing every dicom_node and pacsbridge module and building the node's services
# changes nothing; install() changes what it changes.
_SNAPSHOT = """
import importlib, inspect, json, pkgutil, sys, tempfile, types
import pynetdicom

SKIP = ("pynetdicom.apps", "pynetdicom.tests", "pynetdicom.benchmarks", "pynetdicom.__main__")
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(pynetdicom.__path__, "pynetdicom.")
    if not m.name.startswith(SKIP)
)
for name in MODULES:
    importlib.import_module(name)
MODULES.insert(0, "pynetdicom")
PLAIN = (bool, int, float, str, bytes, type(None))


def record(entries, key, value, depth):
    entries[key] = value
    if depth < 2 and type(value) in (dict, list, tuple):
        items = value.items() if type(value) is dict else enumerate(value)
        for item_key, item in items:
            record(entries, f"{key}[{item_key!r}]", item, depth + 1)


def snapshot():
    entries = {}
    for name in MODULES:
        for attr, value in list(vars(sys.modules[name]).items()):
            record(entries, f"{name}:{attr}", value, 0)
            if isinstance(value, type) and value.__module__ == name:
                for member, member_value in list(vars(value).items()):
                    record(entries, f"{name}:{attr}.{member}", member_value, 1)
    return entries


MISSING = object()


def same(a, b):
    if a is b:
        return True
    return type(a) is type(b) and type(a) in PLAIN and a == b


def target(value):
    if isinstance(value, property):
        value = value.fget
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if inspect.isfunction(value) or inspect.isclass(value):
        module = getattr(value, "__module__", "") or ""
        if module.split(".")[0] == "pynetdicom":
            return f"{module}:{value.__qualname__}"
    return None


def changes(before, after):
    found = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, MISSING), after.get(key, MISSING)
        if same(old, new):
            continue
        if type(old) is type(new) and type(old) in (dict, list, tuple):
            continue  # a container whose items changed: each item is a change of its own
        found.append(
            {"key": key, "old": None if old is MISSING else target(old), "added": old is MISSING}
        )
    return found


first = snapshot()
EXTRA_BEFORE
import dicom_node, pacsbridge
for package in (dicom_node, pacsbridge):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
from archive import Archive
from config import Settings
from dicom_node import DimseServer
from dicom_node.forward import Forwarder
from dicom_node.retrieve import RetrieveService

with tempfile.TemporaryDirectory() as tmp:
    settings = Settings(data_dir=tmp, dimse_host="127.0.0.1", dimse_port=0, log_level="INFO")
    archive = Archive(settings)
    try:
        DimseServer(archive, settings)
        DimseServer(archive, settings, handed_over=True)
        RetrieveService(archive, settings)
        Forwarder(archive, settings)
    finally:
        archive.close()
second = snapshot()
from dicom_node import patches
patches.install("INFO")
EXTRA_AFTER
third = snapshot()
print(json.dumps({"before_install": changes(first, second), "install": changes(second, third)}))
"""


def _snapshot(extra_before: str = "", extra_after: str = "") -> dict[str, list[dict[str, Any]]]:
    code = _SNAPSHOT.replace("EXTRA_BEFORE", extra_before or "pass")
    done = _python(code.replace("EXTRA_AFTER", extra_after or "pass"))
    assert done.returncode == 0, done.stderr
    return cast(dict[str, list[dict[str, Any]]], json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def snapshot() -> dict[str, list[dict[str, Any]]]:
    return _snapshot()


def _sleepers(module_name: str, name: str) -> set[str]:
    """``module:Qualified.name`` of each function of a pynetdicom module that uses the module
    global ``name`` (as ``name.anything``)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    found: set[str] = set()

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                uses = any(
                    isinstance(n, ast.Attribute)
                    and isinstance(n.value, ast.Name)
                    and n.value.id == name
                    for n in ast.walk(child)
                )
                if uses:
                    found.add(f"{module_name}:{prefix}{child.name}")

    visit(tree, "")
    return found


def unpinned(
    changes: list[dict[str, Any]],
    pins: tuple[patches.Pin, ...],
    settings: dict[str, str],
    module_globals: dict[str, str],
) -> list[str]:
    """What ``install()`` changed that is neither pinned nor declared, one line each."""
    pinned = {pin.target for pin in pins}
    problems = []
    for change in changes:
        key = change["key"]
        module, _, attr = key.partition(":")
        if module == "pynetdicom._config":
            if attr not in settings:
                problems.append(f"{key}: a pynetdicom setting not in patches.SETTINGS")
        elif change["old"] is not None:
            if change["old"] not in pinned:
                problems.append(f"{key}: replaces {change['old']}, which has no pin")
        elif key in module_globals:
            for user in sorted(_sleepers(module, attr) - pinned):
                problems.append(f"{key}: {user} uses it and has no pin")
        else:
            what = "added" if change["added"] else "replaced"
            problems.append(f"{key}: {what}, neither pynetdicom code nor declared in patches")
    return problems


def test_importing_the_node_and_building_its_services_changes_nothing_in_pynetdicom(snapshot):
    assert snapshot["before_install"] == []


def test_every_change_install_makes_to_pynetdicom_is_pinned_or_declared(snapshot):
    problems = unpinned(snapshot["install"], patches.PINS, patches.SETTINGS, patches.GLOBALS)
    assert not problems, "\n".join(problems)
    keys = {change["key"] for change in snapshot["install"]}
    # Nothing declared that install() does not do.
    assert {f"pynetdicom._config:{name}" for name in patches.SETTINGS} <= keys
    assert set(patches.GLOBALS) <= keys
    # What it replaces, for the reader of this test (each is pinned, see above).
    replaced = {change["old"] for change in snapshot["install"] if change["old"]}
    assert {
        "pynetdicom.dul:DULServiceProvider.run_reactor",
        "pynetdicom.dul:DULServiceProvider._read_pdu_data",
        "pynetdicom.association:Association.__init__",
        "pynetdicom.association:Association.accepted_contexts",
        "pynetdicom.fsm:AE_6",
        "pynetdicom.fsm:AA_8",
        "pynetdicom.pdu:P_DATA_TF",
        "pynetdicom.transport:AssociationSocket.ready",
        "pynetdicom.utils:set_uid",
    } <= replaced


def test_a_patch_without_a_pin_is_reported():
    """The check above can fail: an extra replacement after install() is named."""
    taken = _snapshot(
        extra_after="import pynetdicom.dul\n"
        "pynetdicom.dul.DULServiceProvider.send_pdu = lambda self, primitive: None"
    )
    problems = unpinned(taken["install"], patches.PINS, patches.SETTINGS, patches.GLOBALS)
    assert problems == [
        "pynetdicom.dul:DULServiceProvider.send_pdu: replaces "
        "pynetdicom.dul:DULServiceProvider.send_pdu, which has no pin"
    ]


def test_a_change_before_install_is_reported():
    taken = _snapshot(
        extra_before="from pynetdicom import _config\n_config.STORE_SEND_CHUNKED_DATASET = True"
    )
    assert [c["key"] for c in taken["before_install"]] == [
        "pynetdicom._config:STORE_SEND_CHUNKED_DATASET"
    ]


def test_every_function_that_sleeps_through_the_replaced_time_module_is_pinned(snapshot):
    users = _sleepers("pynetdicom.association", "time")
    assert "pynetdicom.association:Association._abort_blocking" in users
    assert "pynetdicom.association:Association.send_c_echo" in users
    echo = "pynetdicom.association:Association.send_c_echo"
    pins = tuple(p for p in patches.PINS if p.target != echo)
    assert unpinned(snapshot["install"], pins, patches.SETTINGS, patches.GLOBALS) == [
        f"pynetdicom.association:time: {echo} uses it and has no pin"
    ]


def test_install_sets_pynetdicoms_settings_for_the_log_level():
    done = _python(
        """
        from pynetdicom import _config
        from dicom_node import patches

        patches.install("DEBUG")
        debug = _config.LOG_HANDLER_LEVEL
        patches.install("INFO")
        print(debug, _config.LOG_HANDLER_LEVEL, _config.STORE_SEND_CHUNKED_DATASET,
              _config.LOG_REQUEST_IDENTIFIERS, _config.LOG_RESPONSE_IDENTIFIERS)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["standard", "none", "True", "False", "False"]


def test_install_adds_the_decoding_log_filter_once():
    done = _python(
        """
        import logging
        from dicom_node import patches

        logger = logging.getLogger("pynetdicom.utils")
        before = len(logger.filters)
        patches.install()
        patches.install()
        print(before, len(logger.filters))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]


def test_the_dimse_server_does_not_start_on_unprepared_pynetdicom(tmp_path: Path):
    done = _python(
        f"""
        from archive import Archive
        from config import Settings
        from dicom_node import DimseServer

        settings = Settings(data_dir={str(tmp_path / "data")!r}, dimse_host="127.0.0.1",
                            dimse_port=0)
        archive = Archive(settings)
        try:
            DimseServer(archive, settings).start()
        except RuntimeError as exc:
            print(exc)
        finally:
            archive.close()
        """
    )
    assert done.returncode == 0, done.stderr
    assert "call dicom_node.patches.install() first" in done.stdout


@pytest.mark.parametrize("name", list(status.CATEGORIES))
def test_status_codes_are_pynetdicoms(name: str):
    code, table, category = status.CATEGORIES[name]
    assert getattr(status, name) == code
    assert getattr(pynetdicom.status, table)[code][0] == category
    assert code_to_category(code) == category


def test_every_status_constant_is_checked():
    constants = {name for name in vars(status) if name.startswith("STATUS_")}
    assert constants == set(status.CATEGORIES)


def test_remembered_uids_follow_pynetdicoms_validation_settings(pynetdicom_patched):
    """The table of validated UIDs holds for the validator it was filled under: a stricter
    one set through pynetdicom's ``_config`` applies at once."""
    uid = "1.2.826.0.1.3680043.10.1506.99.1"
    assert uids.set_uid(uid, "Test UID") == uid
    assert uid in uids._validated

    def refuse(value: UID) -> tuple[bool, str]:
        return False, "refused by the site's validator"

    original = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = refuse
    try:
        with pytest.raises(ValueError, match="refused by the site's validator"):
            uids.set_uid(uid, "Test UID")
    finally:
        _config.VALIDATORS["UI"] = original
    assert uids.set_uid(uid, "Test UID") == uid
