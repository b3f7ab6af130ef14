"""Experiments we create carry MLflow's experiment kind for custom model development, and the printed
link opens a run in the UI's model-training view."""

from mlflow.tracking import MlflowClient

from mm_lightning.tracking import (
    CUSTOM_MODEL_DEVELOPMENT,
    EXPERIMENT_KIND_TAG,
    ensure_experiment,
    ui_command,
)


def test_new_and_old_experiments_get_the_model_training_kind(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    new = ensure_experiment(client, "fresh", uri)
    assert CUSTOM_MODEL_DEVELOPMENT == "custom_model_development"  # the value of MLflow 3.17's ExperimentKind
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT

    old = client.create_experiment("made_before_the_tag")  # as an earlier mm_lightning left it
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(client, "made_before_the_tag", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == CUSTOM_MODEL_DEVELOPMENT

    chosen = client.create_experiment("user_choice", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(client, "user_choice", uri)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's kind stays


def test_ui_command_links_the_run_in_the_model_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, "fresh", uri)
    run_id = client.create_run(experiment_id).info.run_id
    text = ui_command(uri, run_id)
    assert text.startswith(f"mlflow ui --backend-store-uri {uri}")
    assert text.endswith(f"/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning")
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
