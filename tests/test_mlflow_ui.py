"""The MLflow UI on a store the pipeline wrote, opened in a real browser (headless Chromium): the experiment opens on
its training runs, the runs table shows the Dice, two runs compare, the registry shows the champion and its model
card, and a run's plots are there as pictures. Skipped where no Chromium with chromedriver is installed (CI)."""

from __future__ import annotations

import pytest

from tests.conftest import free_port, load_script, planned_and_preprocessed


ui = load_script("docs/mlflow_ui.py", "mlflow_ui")
pytestmark = pytest.mark.skipif(ui.browser_paths() is None,
                                reason="no Chromium with chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture
def pipeline_store(tiny_ingested, params_for):
    """A store written by the pipeline's stages as `dvc repro` runs them: fold 0 and the all-data model trained,
    evaluated, registered."""
    from medseg.evaluation import evaluate
    from medseg.registry import register
    from medseg.training import train

    params = planned_and_preprocessed(params_for(paths={"ingested": str(tiny_ingested)},
                                                 train={"final_model": True}))
    train.run(params)
    evaluate.run(params)
    register.run(params)
    return params


def test_a_user_finds_the_runs_with_their_dice_a_comparison_the_champion_its_card_and_the_plots(pipeline_store,
                                                                                                  tmp_path):
    import mlflow
    from PIL import Image

    from medseg.common.tracking import EXPERIMENT_KIND, runs_view_url

    uri = pipeline_store.mlflow.tracking_uri
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(pipeline_store.mlflow.experiment)
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    fold, final = runs["unet-fold0"], runs["unet-foldall"]
    (model,) = client.search_registered_models()
    champion = client.get_model_version_by_alias(model.name, "champion")
    assert champion.run_id == final.info.run_id
    eid = experiment.experiment_id

    with Image.open(client.download_artifacts(fold.info.run_id, "evaluation/plots/training_curves.png",
                                              str(tmp_path))) as picture:
        width = picture.width
    with ui.mlflow_ui(uri, free_port(), tmp_path / "ui.log") as url, ui.browser() as driver:
        # the experiment opens on its training runs (MLflow 3 would open a GenAI traces overview)
        ui.open_page(driver, f"{url}/#/experiments/{eid}?workflowType=machine_learning", "unet-fold0",
                     "unet-foldall")
        assert f"/experiments/{eid}/runs" in driver.current_url and "overview" not in driver.current_url

        # the Dice at a glance: the fold's held-out Dice and the served model's cross-validated Dice in the table
        shown = ui.open_page(driver, runs_view_url(url, eid), "cv_dice_mean", "heldout_dice_mean", "best_val_dice")
        assert str(fold.data.metrics["heldout_dice_mean"]) in shown
        assert str(final.data.metrics["cv_dice_mean"]) in shown
        assert "does not exist" not in shown  # the view's tag is on the experiment

        where = ui.pages(url, eid, [fold.info.run_id, final.info.run_id], model.name, champion.version,
                         "evaluation/plots/training_curves.png")
        # two runs side by side, with their metrics
        ui.open_page(driver, where["compare"], "Comparing 2 Runs", "unet-fold0", "unet-foldall", "cv_dice_mean",
                     "heldout_dice_mean")

        # the registry: the champion alias, and the model card as the version's description
        ui.open_page(driver, where["model"], model.name, "champion", f"Version {champion.version}")
        card_lines = [line.strip("# ") for line in champion.description.splitlines() if line.strip("# ")]
        ui.open_page(driver, where["model_card"], "champion", card_lines[0], "Cross-validation", "Provenance")

        # the run's artifacts: the training curves and the overlays, the picture itself shown
        ui.open_page(driver, where["plot"], "training_curves.png", "overlay_", "metrics.json")
        assert ui.picture_shown(driver, width), f"the {width} px wide training-curves picture was not shown"
