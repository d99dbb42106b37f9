"""The node's changes to pynetdicom (dicom_node/patches.py): pinned to the upstream source they
were written against, applied only by ``install()``, and deferring to pynetdicom's own settings
and status tables where those exist."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_pins_cover_every_replaced_pynetdicom_function():
    """Every pynetdicom attribute install() assigns has its upstream original pinned."""
    pinned = {pin.target for pin in patches.PINS}
    replaced = {
        "pynetdicom.dul:DULServiceProvider.run_reactor",
        "pynetdicom.dul:DULServiceProvider.kill_dul",
        "pynetdicom.dul:DULServiceProvider.stop_dul",
        "pynetdicom.dul:DULServiceProvider._read_pdu_data",
        "pynetdicom.association:Association.__init__",
        "pynetdicom.association:Association.kill",
        "pynetdicom.association:Association.run_reactor",
        "pynetdicom.association:Association._run_reactor",
        "pynetdicom.association:Association.accepted_contexts",
        "pynetdicom.fsm:AE_6",
        "pynetdicom.fsm:DT_1",
        "pynetdicom.fsm:AR_7",
        "pynetdicom.dimse:DIMSEServiceProvider.send_msg",
        "pynetdicom.utils:set_uid",
        "pynetdicom.presentation:PresentationContext.add_transfer_syntax",
        "pynetdicom.transport:RequestHandler.handle",
        "pynetdicom.transport:RequestHandler._create_association",
    }
    assert replaced <= pinned, replaced - pinned


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


def test_importing_the_node_changes_nothing_in_pynetdicom_until_install():
    done = _python(
        """
        import logging
        import pynetdicom.association, pynetdicom.dul, pynetdicom.fsm, pynetdicom.utils
        from pynetdicom import _config
        from pynetdicom.dimse import DIMSEServiceProvider

        def state():
            return (
                pynetdicom.dul.DULServiceProvider.run_reactor.__module__,
                pynetdicom.dul.DULServiceProvider._read_pdu_data.__module__,
                pynetdicom.association.Association.run_reactor.__module__,
                pynetdicom.association.Association.__init__.__module__,
                pynetdicom.association.time.__class__.__name__,
                pynetdicom.fsm.ACTIONS["AE-6"][1].__module__,
                pynetdicom.fsm.P_DATA_TF.__module__,
                DIMSEServiceProvider.send_msg.__module__,
                pynetdicom.utils.set_uid.__module__,
                _config.LOG_REQUEST_IDENTIFIERS,
                len(logging.getLogger("pynetdicom.utils").filters),
            )

        before = state()
        import dicom_node, dicom_node.server, dicom_node.find, dicom_node.retrieve
        import dicom_node.forward, dicom_node.store_receive, dicom_node.patches
        import pacsbridge.dimse_pool
        assert state() == before, (state(), before)
        assert before[0] == "pynetdicom.dul" and before[4] == "module", before
        dicom_node.patches.install()
        dicom_node.patches.install()  # once only
        after = state()
        assert after == (
            "dicom_node.reactor",
            "dicom_node.upper_layer",
            "dicom_node.acceptor",
            "dicom_node.reactor",
            "_ReactorClock",
            "dicom_node.upper_layer",
            "dicom_node.pdata",
            "dicom_node.pdata",
            "dicom_node.uids",
            False,
            1,
        ), after
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


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
