"""The MLflow UI a user opens, in a real browser: `mlflow server` on 127.0.0.1 over two real
training runs, driven by headless Chromium (Debian's `chromium` and `chromium-driver`,
which .ci/run installs) through selenium.

Set NORMLAB_UI_SCREENSHOTS=docs/ui to write the README's screenshots there; otherwise they
go to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import cli_env
from tests.mlflow_server import MlflowServer

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = os.environ.get("NORMLAB_UI_SCREENSHOTS")
MODEL_TRAINING = "?workflowType=machine_learning"  # MLflow 3.17's switch between GenAI and model training


@dataclass
class UI:
    server: MlflowServer
    driver: object  # selenium.webdriver.Chrome
    experiment_id: str
    runs: dict  # run name -> mlflow Run
    shots: Path

    def open(self, path: str, *expected: str, timeout: float = 60) -> str:
        """Load a page of the UI afresh and wait until its text shows every expected string.
        From a blank page: a change of the URL's fragment alone is the open page's to handle,
        and a redirect that page started late (to its GenAI overview) could win."""
        self.driver.get("about:blank")
        self.driver.get(self.server.uri + "/#" + path)
        return self.wait_for(*expected, timeout=timeout)

    def wait_for(self, *expected: str, timeout: float = 60) -> str:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def text(driver):
            body = driver.find_element(By.TAG_NAME, "body").text
            return body if all(e in body for e in expected) else False

        try:
            return WebDriverWait(self.driver, timeout).until(text)
        except Exception:
            body = self.driver.find_element(By.TAG_NAME, "body").text
            pytest.fail(f"{self.driver.current_url} did not show {expected} within {timeout} s; it shows:\n{body[:3000]}")

    def screenshot(self, name: str, width: int = 1600, height: int = 1000) -> None:
        """Save the page, once charts and tables have drawn, as NAME.png."""
        self.driver.set_window_size(width, height)
        time.sleep(2)
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))


@pytest.fixture(scope="module")
def ui(tmp_path_factory, small_mnist_dir):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium here: the browser check needs `apt-get install -y chromium chromium-driver` "
                    "(.ci/run installs them; their install failed or was not possible on this machine)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("ui")
    shots = Path(SCREENSHOTS).resolve() if SCREENSHOTS else root / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root)
    server.start()
    driver = None
    try:
        env = cli_env(MLFLOW_TRACKING_URI=server.uri)
        trainings = [subprocess.Popen([sys.executable, "-m", "normlab", "train", "--norm", norm, "--epochs", "2",
                                       "--data-dir", str(small_mnist_dir), "--device", "cpu"],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for norm in ("bn", "gn")]
        for proc in trainings:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("normlab")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1600,1000", f"--user-data-dir={root / 'chromium-profile'}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(server.uri + "/health")  # the UI's origin, to set its local storage
        # MLflow's assistant panel opens by itself on a first visit and covers a third of the page
        driver.execute_script("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
        yield UI(server, driver, experiment.experiment_id, runs, shots)
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


def test_experiment_opens_in_the_model_training_view_with_the_runs_and_their_test_acc(ui):
    assert set(ui.runs) == {"bn-s1", "gn2-s1"}
    tags = MlflowClient(ui.server.uri).get_experiment(ui.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"

    # MLflow 3.17 opens every experiment in its GenAI view until the user picks "Model
    # training" (it ignores the experiment's kind tag): the README says so and gives the link
    page = ui.open(f"/experiments/{ui.experiment_id}", "Training runs", "Traces")
    assert "bn-s1" not in page
    page = ui.open(f"/experiments/{ui.experiment_id}{MODEL_TRAINING}", "Runs", "Models", "bn-s1", "gn2-s1")
    assert "2 matching runs" in page and "Training runs" not in page
    ui.screenshot("runs")
    # the link does not stick; one click on the sidebar's switch does
    ui.open(f"/experiments/{ui.experiment_id}", "Training runs")
    from selenium.webdriver.common.by import By

    switch = ui.driver.find_element(By.XPATH, "//*[normalize-space(text())='Model training']")
    ui.driver.execute_script("arguments[0].click()", switch)  # a tip popover may cover it
    ui.wait_for("2 matching runs")
    page = ui.open(f"/experiments/{ui.experiment_id}", "bn-s1", "gn2-s1")
    assert "Training runs" not in page

    ui.driver.execute_script("document.querySelector('input[name=runs-view-mode][value=CHART]').click()")
    page = ui.wait_for("bn-s1 (test_acc)", "gn2-s1 (test_acc)", "gn2-s1 (test_loss)")
    assert "Model metrics\n(4)" in page
    ui.screenshot("runs-charts")


def test_a_runs_page_charts_its_four_histories(ui):
    run = ui.runs["gn2-s1"]
    page = ui.open(f"/experiments/{ui.experiment_id}/runs/{run.info.run_id}/model-metrics{MODEL_TRAINING}",
                   "gn2-s1 (test_acc)", "gn2-s1 (train_loss)")
    assert all(f"gn2-s1 ({metric})" in page for metric in ("test_acc", "test_loss", "train_acc", "train_loss"))
    ui.screenshot("run-charts")


def as_the_ui_writes(value: float) -> str:
    """A metric as the UI's JavaScript writes it: 12.0 is "12", 2.1741 stays "2.1741"."""
    return str(int(value)) if value.is_integer() else repr(value)


def test_the_models_table_names_each_model_after_its_run_with_its_final_metrics(ui):
    page = ui.open(f"/experiments/{ui.experiment_id}/models{MODEL_TRAINING}", "bn-s1", "gn2-s1")
    ui.driver.set_window_size(2200, 800)  # the metric columns come after the model's attributes
    page = ui.wait_for("test_acc", "test_loss")
    for name, run in ui.runs.items():
        metrics = run.data.metrics
        assert page.count(name) == 2, name  # the model and its source run
        assert as_the_ui_writes(metrics["test_acc"]) in page and as_the_ui_writes(metrics["test_loss"]) in page, \
            (name, metrics)
    ui.screenshot("models", width=2200, height=700)
