"""The operator's progress reads against the real S3 server (tests/conftest.py): one store client per bucket,
endpoint and credentials, kept for the reader's life (operators/progress.py, ProgressReader)."""

from __future__ import annotations

import pytest

from operators.progress import ProgressReader, read_progress
from ttrv.store import StoreAuthError, open_store


def test_runs_of_one_bucket_share_one_client_and_see_every_new_write(s3_env, s3_uri):
    runs = [f"{s3_uri}/team-a/exp/{dataset}" for dataset in ("mmmu", "shapes")]
    reader = ProgressReader()
    try:
        assert reader(runs[0]) is None  # no progress.json yet
        for step, uri in enumerate(runs):
            with open_store(uri) as trainer:
                trainer.put_json("progress.json", {"step": step})
        assert [reader(uri) for uri in runs] == [{"step": 0}, {"step": 1}] == [read_progress(uri) for uri in runs]
        with open_store(runs[0]) as trainer:
            trainer.put_json("progress.json", {"step": 7})
        assert reader(runs[0]) == {"step": 7}
        assert len(reader) == 1
    finally:
        reader.close()


def test_other_credentials_get_a_client_of_their_own(s3_env, s3_uri, monkeypatch):
    uri = f"{s3_uri}/team-a/exp/mmmu"
    reader = ProgressReader()
    try:
        assert reader(uri) is None
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(StoreAuthError):
            reader(uri)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
        assert reader(uri) is None and len(reader) == 1  # the first client again; the refused one was never kept
    finally:
        reader.close()
