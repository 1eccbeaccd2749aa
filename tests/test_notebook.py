"""notebooks/quickstart.ipynb runs top to bottom, and its outputs show no secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.secrets import find_secrets

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_committed_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == []
            assert cell.execution_count is None


def test_quickstart_runs(
    kms_settings: KmsSettings,
    key_service: KeyService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    properties = tmp_path / "kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    monkeypatch.setenv("SPARK_KMS_CONF", str(properties))
    monkeypatch.setenv("SPARK_KMS_QUICKSTART_DIR", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    location = tmp_path / "flights_small"
    secrets: list[bytes] = []
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if "erase_table" in cell.source:
                # Take the table's keys before the notebook destroys them.
                meta, store = key_service.open_table_for_read(str(location))
                keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
                secrets += [keys.kek(kek_id) for kek_id in keys.key_ids]
                secrets += [
                    base64.b64decode(store.get_kek_record(kek_id).wrapped_kek)
                    for kek_id in keys.key_ids
                ]
            client.execute_cell(cell, index)

    outputs = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    assert "Traceback" not in outputs
    # A line on stderr that arrives between two stdout writes splits the cell's
    # stdout into several stream outputs, so the test joins them per cell.
    printed = [
        "".join(
            output.get("text", "")
            for output in cell.get("outputs", [])
            if output.get("name") == "stdout"
        )
        for cell in notebook.cells
    ]
    assert any("b'PARE' b'PARE'" in text for text in printed)
    erased = [text for text in printed if text.startswith("TableErasedError: ")]
    assert len(erased) == 1
    assert erased[0].startswith("TableErasedError: table 'flights_small_")
    assert "was crypto-erased" in erased[0]
    assert "KeyService(token=" in outputs
    assert len(secrets) == 4
    assert kms_settings.pin_file is not None
    secrets.append(Path(kms_settings.pin_file).read_text().strip().encode())
    assert find_secrets(outputs, secrets) == []
