"""Atomic writes: a failed write keeps the previous version and leaves nothing behind."""

import json

import pytest

from gemma_assets.core.files import atomic_dir, atomic_file, write_json


def test_failed_file_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"fvu": 0.25})
    with pytest.raises(RuntimeError), atomic_file(target) as staging:
        staging.write_text('{"fvu": 0.')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"fvu": 0.25}
    assert list(tmp_path.iterdir()) == [target]


def test_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "k-00064"
    with atomic_dir(target) as staging:
        (staging / "model.npz").write_text("v1")
        (staging / "metrics.json").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "model.npz").write_text("v2")
        raise RuntimeError("killed between the model and its metrics")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.npz": "v1", "metrics.json": "v1"}
    with atomic_dir(target) as staging:
        (staging / "model.npz").write_text("v3")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"model.npz": "v3"}  # nothing stale survives
    assert list(tmp_path.iterdir()) == [target]
