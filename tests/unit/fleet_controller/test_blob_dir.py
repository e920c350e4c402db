"""The blob directory every replica of a store shares (fleet_controller.blobs.check_blob_dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_controller.blobs import MARKER, BlobDirError, check_blob_dir
from fleet_controller.store import Store


def test_the_first_directory_is_marked_and_recorded_and_others_are_refused(
    tmp_path: Path,
) -> None:
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    with Store.open(str(tmp_path / "fleet.db")) as store:
        dir_id = check_blob_dir(shared, store.store_id, store.claim_blob_dir)
        assert (shared / MARKER).read_text().split() == [store.store_id, dir_id]
        # Another replica on the same directory (or the same one restarted) joins.
        assert check_blob_dir(shared, store.store_id, store.claim_blob_dir) == dir_id
        # A replica with a folder of its own is refused, in one line naming both ids.
        with pytest.raises(BlobDirError) as caught:
            check_blob_dir(local, store.store_id, store.claim_blob_dir)
        message = str(caught.value)
        assert "\n" not in message
        assert dir_id in message
        assert "not the one the replicas of store" in message
        # Adopting a replacement directory is writing the recorded identity into its marker.
        (local / MARKER).write_text(f"{store.store_id} {dir_id}\n")
        assert check_blob_dir(local, store.store_id, store.claim_blob_dir) == dir_id


def test_a_directory_of_another_store_or_an_unreadable_marker_is_refused(
    tmp_path: Path,
) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    with Store.open(str(tmp_path / "a.db")) as first, Store.open(str(tmp_path / "b.db")) as other:
        check_blob_dir(blobs, first.store_id, first.claim_blob_dir)
        with pytest.raises(BlobDirError, match=f"belongs to store {first.store_id}"):
            check_blob_dir(blobs, other.store_id, other.claim_blob_dir)
        assert other.claim_blob_dir("probe") == "probe"  # nothing recorded for the refused one
        (blobs / MARKER).write_text("garbage\n")
        with pytest.raises(BlobDirError, match="unreadable"):
            check_blob_dir(blobs, first.store_id, first.claim_blob_dir)
    assert sorted(p.name for p in blobs.iterdir()) == [MARKER]  # no temporary file left
