"""normlab.tracking.redaction: credentials in URIs and secret environment variables never pass."""

import pytest

from normlab.tracking import run_ending
from normlab.tracking.redaction import redact, secret_values


@pytest.mark.parametrize("text, expected", [
    ("the MLflow tracking server http://alice:s3cret@127.0.0.1:5000 cannot be reached",
     "the MLflow tracking server http://***@127.0.0.1:5000 cannot be reached"),
    ("API request to https://alice:s3cret@mlflow.example.org/api/2.0/mlflow/runs/get failed",
     "API request to https://***@mlflow.example.org/api/2.0/mlflow/runs/get failed"),
    ("postgresql://mlflow:pa%40ss@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("http://alice:p@ss@host/x and http://bob@host2", "http://***@host/x and http://***@host2"),
    ("'http://alice:s3cret@127.0.0.1:5000'", "'http://***@127.0.0.1:5000'"),
])
def test_uri_user_and_password_are_removed(text, expected):
    assert redact(text, environ={}) == expected


def test_text_without_credentials_is_unchanged():
    text = ("run abc (LN, seed 1) at http://127.0.0.1:5000/#/experiments/1 failed: bob@example.org; "
            "sqlite:///tmp/mlflow.db; 99.2% after epoch 3")
    assert redact(text, environ={"TOKENIZERS_PARALLELISM": "false", "HOME": "/root"}) == text


def test_secret_variables_are_masked_wherever_they_appear():
    environ = {"MLFLOW_TRACKING_TOKEN": "tok-123456", "AWS_SECRET_ACCESS_KEY": "AKsecretvalue",
               "MY_SERVICE_API_KEY": "k-98765", "MLFLOW_TRACKING_PASSWORD": "s3cret",
               "DATABRICKS_TOKEN": "1",  # too short to tell from ordinary text: left alone
               "TOKENIZERS_PARALLELISM": "false"}
    text = "Bearer tok-123456 rejected; key AKsecretvalue, k-98765; password s3cret; 1 false"
    assert redact(text, environ) == "Bearer *** rejected; key ***, ***; password ***; 1 false"
    assert secret_values(environ) == ["AKsecretvalue", "tok-123456", "k-98765", "s3cret"]


def test_a_secret_containing_another_is_masked_whole():
    environ = {"MLFLOW_TRACKING_PASSWORD": "s3cret", "MLFLOW_TRACKING_TOKEN": "xx-s3cret-yy"}
    assert redact("token xx-s3cret-yy", environ) == "token ***"


def test_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter22")
    assert redact("login hunter22 at http://u:hunter22@h:1") == "login *** at http://***@h:1"


def test_reasons_normlab_records_in_tags_are_redacted(tracking_uri, monkeypatch):
    """record_ending and fail_run_if_open take reasons built from MLflow's exception texts,
    which carry the whole tracking URI; the tags in the store do not."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-0123456789")
    client = MlflowClient()
    experiment = client.create_experiment("redaction")
    ended, failed = (client.create_run(experiment).info.run_id for _ in range(2))
    reason = ("MLflow failed during training: API request to http://alice:s3cret@10.0.0.5:5000/api/2.0/mlflow/"
              "runs/log-batch failed (Authorization: Bearer tok-0123456789)")
    assert run_ending.record_ending(ended, "failed", reason)
    run_ending.fail_run_if_open(failed, reason)
    for run_id in (ended, failed):
        recorded = client.get_run(run_id).data.tags["normlab.reason"]
        assert recorded == ("MLflow failed during training: API request to http://***@10.0.0.5:5000/api/2.0/mlflow/"
                            "runs/log-batch failed (Authorization: Bearer ***)")
