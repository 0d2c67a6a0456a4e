"""The documentation site builds strict-clean, and its generated pages name every setting, error type and metric.

The settings, error and metrics tables are generated from the code at build time (docs/hooks/tables.py), so
these checks fail when the hook stops running or a page loses its table, not when the code changes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import ERROR_STATUS
from service.metrics import Metrics
from service.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    proc = subprocess.run(
        [*command, "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    log = proc.stderr + proc.stdout
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.MULTILINE), log
    return out


def _text(page: Path) -> str:
    return page.read_text()


def test_every_setting_is_on_the_settings_page(site: Path) -> None:
    html = _text(site / "settings" / "index.html")
    names = [f"MHA_{name.upper()}" for name in Settings.model_fields]
    assert len(names) > 40
    missing = [n for n in names if f"<code>{n}</code>" not in html]
    assert not missing, missing
    # each row carries the field's default and description, not only its name
    assert "Most sequences in one forward pass." in html
    assert "<code>32768</code>" in html  # MHA_MAX_BATCH_TOKENS' default


def test_every_error_type_and_status_is_on_the_wire_contract_page(site: Path) -> None:
    html = _text(site / "wire-contract" / "index.html")
    rows = re.findall(r"<td>(\d{3})</td>\s*<td><code>(\w+)</code></td>", html)
    assert dict((kind, int(status)) for status, kind in rows) == ERROR_STATUS
    assert "499" in html  # the client went away: a status with no type, described in prose


def test_every_metric_is_on_the_operating_page(site: Path) -> None:
    html = _text(site / "operating" / "index.html")
    families = list(Metrics().registry.collect())
    assert families
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"<code>{name}</code>" in html, name


def test_the_api_pages_render_the_docstrings(site: Path) -> None:
    client = _text(site / "api" / "mha_client" / "index.html")
    core = _text(site / "api" / "mha_core" / "index.html")
    assert 'id="mha_client.Client"' in client and 'id="mha_client.plot_weights"' in client
    assert 'id="mha_core.attention.MultiHeadAttention"' in core


def test_the_pictures_are_in_the_site(site: Path) -> None:
    html = _text(site / "client" / "index.html")
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) == 3
    for src in images:
        png = (site / "client" / src).resolve()
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src


def test_the_readme_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link
    assert len(readme.splitlines()) <= 150
