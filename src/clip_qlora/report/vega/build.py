"""Rebuild dvc_plots.html, the HTML template `dvc plots show/diff` use here (.dvc/config: plots.html_template).

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline its plots are blank. This template
carries the three minified UMD builds inline instead: every page DVC writes from it renders with no network,
wherever it is moved. The versions are the newest of the majors DVC's renderer asks for (vega 5, vega-lite 5,
vega-embed 6: later majors ship ES modules only, which cannot define the global `vegaEmbed` that DVC's inline
plot scripts call). Maintainer's tool, needs npm:  python src/clip_qlora/report/vega/build.py
"""
from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.33.1", "vega-lite": "5.23.0", "vega-embed": "6.29.0"}  # load order: each needs the one before
HERE = Path(__file__).resolve().parent

PAGE = """<!DOCTYPE html>
<!-- DVC plots page with vega {vega}, vega-lite {vega-lite} and vega-embed {vega-embed} inline (BSD-3-Clause,
     University of Washington Interactive Data Lab: LICENSE beside this file). Built by build.py. -->
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def build() -> str:
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in PACKAGES.items():
            out = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(tmp) / out) as tar:
                js = tar.extractfile(f"package/build/{name}.min.js").read().decode()
            # DVC fills the template with str.replace of these names; inline, "</script" would end the tag
            assert "</script" not in js and not any(f"{{{k}}}" in js for k in ("scripts", "plot_divs", "refresh_tag"))
            scripts.append(f"    <script>/* {name} {version} */\n{js}\n    </script>")
    return PAGE.format(scripts="\n".join(scripts), **PACKAGES)


if __name__ == "__main__":
    (HERE / "dvc_plots.html").write_text(build(), encoding="utf8")
