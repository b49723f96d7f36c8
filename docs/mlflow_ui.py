"""The MLflow UI of a medseg store, opened in a real browser (headless Chromium driven by Selenium).

Used by ``tests/test_mlflow_ui.py`` (what a user comes for is on the pages) and, run as a script, to regenerate the
README's pictures from the project's own store after ``make pipeline``::

    .venv/bin/python docs/mlflow_ui.py            # writes docs/images/mlflow_*.png

Needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``) and ``selenium`` (the ``test``
extra). Nothing here is imported by medseg itself.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WAIT_SECONDS = 60


def browser_paths() -> tuple[str, str] | None:
    """(browser, driver) executables found on PATH, or None: the pages cannot be opened here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def mlflow_ui(store_uri: str, port: int, log_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on ``store_uri`` at 127.0.0.1:``port`` (the UI and its REST API); yields its URL."""
    mlflow = Path(sys.executable).with_name("mlflow")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # run as a script: the tests' helper that waits for a server
    from tests.conftest import wait_until_up

    try:
        wait_until_up(url + "/health", proc, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def browser(width: int = 1600, height: int = 900) -> Iterator[object]:
    """A headless Chromium (Selenium WebDriver) with the window size of the README's pictures."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise RuntimeError("no Chromium with chromedriver (apt-get install chromium chromium-driver) or no selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, url: str, *texts: str) -> str:
    """Open ``url`` and wait until the page shows every one of ``texts``; returns the page's visible text.

    Raises TimeoutError naming the texts that never appeared (and the start of what the page did show).
    """
    driver.get("about:blank")  # a full load, as a user pasting the address: not a route change inside the page,
    driver.get(url)  # where the UI would first put its remembered sorting into the address and ignore a shared view
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        shown = driver.execute_script("return document.body.innerText")  # WebDriver's .text drops some table cells
        missing = [t for t in texts if t not in shown]
        if not missing:
            return shown
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never showed {missing}; it showed: {shown[:800]!r}")
        time.sleep(0.5)


def picture_shown(driver, width: int, seconds: float = 30) -> bool:
    """Whether the page shows a decoded picture ``width`` pixels wide within ``seconds`` (the UI shows an artifact's
    picture from a ``blob:`` URL, so it is known by its size, not its name)."""
    deadline = time.monotonic() + seconds
    while not driver.execute_script("return Array.from(document.images).some(i => i.complete && "
                                    "i.naturalWidth === arguments[0])", width):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def close_assistant(driver) -> None:
    """Close MLflow's assistant panel when it is open (it covers a third of every page in the pictures)."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            button.click()


def scroll_to(driver, heading: str) -> None:
    """Scroll the last element whose own text is ``heading`` to the top of the window (the compare page's metrics
    table sits below its plots and parameters)."""
    found = driver.find_elements("xpath", f"//*[normalize-space(text())='{heading}']")
    if found:
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", found[-1])


def pages(base_url: str, experiment_id: str, run_ids: list[str], model_name: str, version: str,
          plot: str) -> dict[str, str]:
    """The addresses a user opens: the runs with their Dice, two runs compared, the registered model, its version's
    model card, and one run's plot."""
    from medseg.common.tracking import runs_view_url

    runs = ",".join(f'"{r}"' for r in run_ids)
    return {
        "runs": runs_view_url(base_url, experiment_id),
        "compare": f"{base_url}/#/compare-runs?runs=[{runs}]&experiments=[\"{experiment_id}\"]",
        "model": f"{base_url}/#/models/{model_name}",
        "model_card": f"{base_url}/#/models/{model_name}/versions/{version}",
        "plot": f"{base_url}/#/experiments/{experiment_id}/runs/{run_ids[0]}/artifacts/{plot}",
    }


def screenshots(store: Path = REPO / "mlflow.db", out: Path = REPO / "docs" / "images", port: int = 5077) -> list[Path]:
    """The README's pictures from ``store`` (the demo pipeline's): the runs table with its Dice, the run comparison,
    the model card and a run's training curves."""
    import mlflow

    uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("medseg")
    folds = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
             if "heldout_dice_mean" in r.data.metrics]
    model = client.search_registered_models()[0]
    champion = client.get_model_version_by_alias(model.name, "champion")
    written = []
    out.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(uri, port, out.parent / "mlflow_ui.log") as url, browser() as driver:
        where = pages(url, experiment.experiment_id, [folds[0].info.run_id, champion.run_id], model.name,
                      champion.version, "evaluation/plots/training_curves.png")
        for name, expected in (("runs", "heldout_dice_mean"), ("compare", "heldout_dice_mean"),
                               ("model_card", "Cross-validation"), ("plot", "training_curves.png")):
            open_page(driver, where[name], expected)
            close_assistant(driver)
            if name == "compare":
                scroll_to(driver, "Metrics")
            time.sleep(2)  # charts and pictures finish drawing
            path = out / f"mlflow_{name}.png"
            driver.save_screenshot(str(path))
            written.append(path)
    (out.parent / "mlflow_ui.log").unlink(missing_ok=True)
    return written


if __name__ == "__main__":
    for picture in screenshots():
        print(picture)
