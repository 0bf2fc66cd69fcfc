"""`dvc plots show/diff` pages render offline: the project's .dvc/config points DVC at an HTML template that
carries vega, vega-lite and vega-embed inline (src/clip_qlora/report/vega/), where DVC's own page loads them from a CDN.

Checked in a real headless browser (Debian's chromium; .ci/run installs it) with every host name unresolvable,
on a DVC project laid out as runs/demo is (a copy of src/ beside .dvc/), through the config alone.
"""
from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from pathlib import Path

from PIL import Image

from tools.demo import configure_dvc

from cli_helpers import ENV, REPO


def test_project_config_points_dvc_at_the_offline_template():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    template = (REPO / ".dvc" / cfg["plots"]["html_template"]).resolve()  # DVC reads it relative to .dvc/
    text = template.read_text(encoding="utf8")
    # DVC fills {plot_divs}; with no {scripts} placeholder its CDN <script src> tags have nowhere to go
    assert "{plot_divs}" in text and "{scripts}" not in text
    assert "<script src" not in text
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"<script>/* {name} " in text


def dark_pixels(png: Path) -> int:
    with Image.open(png) as im:
        hist = im.convert("L").histogram()
    return sum(hist[:200])


def test_dvc_plots_page_renders_offline_in_a_browser(tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "chromium not found: `apt-get install chromium` (.ci/run installs it)"
    repo = tmp_path / "project"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copytree(REPO / "src/clip_qlora/report/vega", repo / "src/clip_qlora/report/vega")
    (repo / "loss.json").write_text(json.dumps([{"step": i, "loss": 1 / (i + 1)} for i in range(20)]))
    (repo / "dvc.yaml").write_text("plots:\n- loss.json:\n    x: step\n    y: loss\n")
    subprocess.run(["dvc", "init", "--no-scm", "-q", "--force"], cwd=repo, env=ENV, check=True)
    configure_dvc(REPO, repo, ENV)  # as make demo and make sweep configure theirs
    subprocess.run(["dvc", "plots", "show", "-q"], cwd=repo, env=ENV, check=True)
    page = repo / "dvc_plots" / "index.html"
    assert "<script src" not in page.read_text(encoding="utf8")  # DVC's CDN tags left out

    shot = tmp_path / "shot.png"
    # every host unresolvable: the page may use nothing but itself
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=800,600",
                    "--virtual-time-budget=10000", f"--screenshot={shot}", page.as_uri()],
                   env=ENV, check=True, capture_output=True, timeout=120)
    # the drawn plot: axes, grid, ticks, labels and the curve (about 4,000 such pixels); a blank page has 0
    assert dark_pixels(shot) > 1000
