"""Retrieval galleries: every registered version gets a self-contained HTML page of validation
tops with their templates and top-5 bottoms (true bottom marked), logged to the run that
registered it; in a real browser (headless Chromium) its pictures load."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from geco import registry
from geco.data.source import open_data
from tests.conftest import register_retriever

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from screenshot import chromium, screenshot  # noqa: E402

MODEL = "gallery-test"


@pytest.fixture(scope="module")
def gallery(retriever_files, synth_small, tiny, tmp_path_factory):
    """Version 1 of MODEL with its gallery logged; (page path, log_gallery result, store)."""
    files, _ = retriever_files
    uri, client, run_id, out = register_retriever(tmp_path_factory.mktemp("gallery_store"),
                                                  files, MODEL)
    result = registry.log_gallery(
        run_id, tracking_uri=uri, geco_checkpoint=files["geco"],
        generator_checkpoint=files["generator"], data=open_data(tiny(synth_small).data),
        metrics={"valid_auc_1vs1": 0.61}, registered_model=MODEL, version=out["version"])
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=registry.GALLERY_PATH, tracking_uri=uri))
    return local, result, client


def test_gallery_is_logged_and_tagged_with_every_row(gallery, synth_small):
    page, result, client = gallery
    html = page.read_text()
    assert result["rows"] == 24 and html.count('<div class="row">') == 24
    # Per row: top, template, 5 bottoms, and the true bottom at the end when it missed.
    hits = html.count('<figure class="true">')
    missed = html.count('class="missed"')
    assert hits + missed == 24
    assert html.count("data:image/jpeg;base64,") == 24 * 7 + missed
    assert "<th>valid_auc_1vs1</th><td>0.6100</td>" in html
    assert f"true bottom in the top 5</th><td>{hits} of 24 tops" in html
    assert f"{MODEL} version 1" in html
    tag = client.get_model_version(MODEL, "1").tags[registry.GALLERY_TAG]
    assert tag == result["uri"] and tag.endswith(registry.GALLERY_PATH)
    # The first row is the first validation top, as the split lists it.
    first = (synth_small / "files" / "valid.csv").read_text().splitlines()[1].split(",")[0]
    assert re.search(r'<div class="row"><figure class=""><img[^>]*alt="top ' + first, html)


def colourful(png: Path) -> int:
    """Pixels with a clear colour (not grey text, white, the green or orange frames)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    spread = a.max(axis=2) - a.min(axis=2)
    frame = ((a == (0, 170, 0)).all(axis=2)) | ((a == (208, 128, 0)).all(axis=2))
    return int(((spread > 60) & ~frame).sum())


@pytest.mark.skipif(chromium() is None, reason="no Chromium (scripts/install_chromium.sh)")
def test_gallery_renders_with_its_pictures_in_chromium(gallery, tmp_path):
    page, _, _ = gallery
    shot = screenshot(str(page), tmp_path / "gallery.png", width=1300, height=1400)
    # The same page with every picture removed: what a reader sees when images fail to load.
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:[^"]*"', 'src="missing.jpg"', page.read_text()))
    empty = screenshot(str(broken), tmp_path / "broken.png", width=1300, height=1400)
    loaded, without = colourful(shot), colourful(empty)
    assert loaded > 50_000 and loaded > 20 * max(without, 1), (loaded, without)
