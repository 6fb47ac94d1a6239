"""The result pages in embedded mode: the API's auth and tenancy, escaping, previews of the
ranked rows (image thumbnails, values, text) and the histogram of all scores."""

from __future__ import annotations

import re

import numpy as np
from fastapi.testclient import TestClient

from service.api.ui.charts import histogram_svg
from service.api.ui.previews import image_pixels, preview
from service.settings import Settings
from tests.service import embedded as e

settings, http = e.module_service("ui")


def test_previews_by_row_shape() -> None:
    digits = preview(np.arange(64, dtype=np.float64), y=3)
    assert digits.label == "3" and digits.image is not None and digits.image.count("<rect") == 64
    rgb, grey = image_pixels(np.zeros((3, 8, 8))), image_pixels(np.zeros((1, 28, 28)))
    assert rgb is not None and rgb.shape == (8, 8, 3) and grey is not None and grey.shape == (28, 28)
    tabular = preview(np.array([0.5, 1.25, -2.0]), y=1.5)
    assert tabular.image is None and tabular.values == "0.5, 1.25, -2"
    long_row = preview(np.ones(30))
    assert long_row.values is not None and long_row.values.endswith("(30 values)")
    text = preview(None, None, "x" * 500)
    assert text.text is not None and len(text.text) == 201


def test_histogram_counts_every_finite_score() -> None:
    svg = histogram_svg(np.array([0.0, 1.0, 1.0, np.nan, 2.0]), bins=4, marks={"top-1 <b>": 2.0})
    bars = [int(n) for n in re.findall(r": (\d+)</title>", svg)]
    assert len(bars) == 4 and sum(bars) == 4
    assert "&lt;b&gt;" in svg and "<b>" not in svg


def test_pages_need_the_api_key_and_hide_other_tenants(settings: Settings, http: TestClient) -> None:
    ids = e.register_toy(settings, http)
    done = e.run(http, {"model_id": ids["model"], "dataset_id": ids["dataset"], "method": "forward_inf",
                        "samples": e.samples(1), "top_k": 3})
    with e.client(settings) as anonymous:
        anonymous.headers.pop("Authorization")
        assert anonymous.get(f"/ui/queries/{done['id']}").status_code == 401
        assert anonymous.get("/ui/queries").status_code == 401
    with e.client(settings, tenant="b") as other:
        assert other.get(f"/ui/queries/{done['id']}").status_code == 404
        assert done["id"] not in other.get("/ui/queries").text

    page = http.get(f"/ui/queries/{done['id']}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    top = [int(i) for i in re.findall(r'class="ranked top" data-rank="\d+" data-index="(\d+)"', html)]
    assert top == [row["index"] for row in done["result"]["top"]]
    assert html.count('class="thumb"') == 0  # the toy's rows have 4 features: values, not images
    assert html.count("<code>") >= 6 and 'class="histogram"' in html
    assert ids["model"] in html and "sha256" in html
    listing = http.get("/ui/queries").text
    assert f'href="/ui/queries/{done["id"]}"' in listing


def test_names_are_escaped(settings: Settings, http: TestClient) -> None:
    path = e.save_model(settings, e.toy().module, "escape.pt")
    response = http.post("/v1/models", json={"name": "<script>alert(1)</script>", "uri": path.as_uri(),
                                             "format": "torchscript", "task": "classification"})
    model_id = response.json()["id"]
    dataset_id = e.register_dataset(http, e.write_shards(settings, [10], prefix="esc"))
    done = e.run(http, {"model_id": model_id, "dataset_id": dataset_id, "method": "forward_inf",
                        "samples": e.samples(1), "top_k": 2})
    html = http.get(f"/ui/queries/{done['id']}").text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_unknown_query_is_a_json_404(http: TestClient) -> None:
    response = http.get("/ui/queries/nope")
    assert response.status_code == 404 and response.json()["error"] == "query_not_found"
