"""The console's fragments and its explain call over real HTTP, through Kiln's Serve app with
keys required: what each key sees, 401/403/404/422, and that the console explains a row as
`:explain` does."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.console.conftest import CONSOLE_MODEL
from tests.serving.test_http import digits_test_rows  # noqa: F401 (a fixture)


def get(url: str, path: str, secret: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.get(f"{url}{path}", headers=headers, timeout=60)


def test_the_shell_needs_no_key_and_holds_no_data(console_url):
    answer = get(console_url, f"/ui/models/{CONSOLE_MODEL}")
    assert answer.status_code == 200
    assert 'data-auth="on"' in answer.text and "/ui/static/console.js" in answer.text
    assert CONSOLE_MODEL not in answer.text


@pytest.mark.parametrize(
    "path",
    ["/ui/fragments/models", f"/ui/fragments/models/{CONSOLE_MODEL}", "/ui/fragments/sweeps"],
)
def test_a_fragment_without_a_live_key_is_401(console_url, path):
    assert get(console_url, path).status_code == 401
    answer = get(console_url, path, "kiln_0123456789ab_not-a-real-secret")
    assert answer.status_code == 401 and "invalid API key" in answer.json()["error"]


def test_an_admin_key_sees_every_model_and_a_model_key_only_its_own(
    console_url, console_keys, trained_digits
):
    everything = get(console_url, "/ui/fragments/models", console_keys["admin"]).text
    assert CONSOLE_MODEL in everything and "digits-mlp" in everything
    own = get(console_url, "/ui/fragments/models", console_keys["model"]).text
    assert CONSOLE_MODEL in own and "digits-mlp" not in own
    nothing = get(console_url, "/ui/fragments/models", console_keys["other"]).text
    assert CONSOLE_MODEL not in nothing and 'id="empty"' in nothing


@pytest.mark.parametrize(
    "page", ["", "/variants", "/monitor", "/versions/1", "/versions/2/explain"]
)
def test_a_model_page_for_a_key_without_its_scope_is_403(console_url, console_keys, page):
    answer = get(console_url, f"/ui/fragments/models/{CONSOLE_MODEL}{page}", console_keys["other"])
    assert answer.status_code == 403
    assert f"predict:{CONSOLE_MODEL}" in answer.json()["error"]


def test_the_version_page_links_parent_and_variant_and_lists_sha256(
    console_url, console_keys, console_versions
):
    first, second = console_versions
    page = get(
        console_url,
        f"/ui/fragments/models/{CONSOLE_MODEL}/versions/{first.version}",
        console_keys["model"],
    ).text
    assert f'href="/ui/models/{CONSOLE_MODEL}/versions/{second.version}"' in page  # its variant
    assert first.artifacts["model.safetensors"] in page
    assert 'id="curves-chart"' in page and 'id="profiles"' in page
    child = get(
        console_url,
        f"/ui/fragments/models/{CONSOLE_MODEL}/versions/{second.version}",
        console_keys["model"],
    ).text
    assert f'class="ref" href="/ui/models/{CONSOLE_MODEL}/versions/{first.version}"' in child


def test_the_variants_page_marks_the_pareto_front(console_url, console_keys, console_versions):
    page = get(console_url, f"/ui/fragments/models/{CONSOLE_MODEL}/variants", console_keys["model"])
    assert page.status_code == 200
    # @1 is more accurate, @2 faster: both are on the front.
    assert page.text.count('class="pareto"') == 2 and 'id="variants-chart"' in page.text


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/ui/fragments/models/no-such-model", 404, "no-such-model"),
        (f"/ui/fragments/models/{CONSOLE_MODEL}/versions/99", 404, "99"),
        (f"/ui/fragments/models/{CONSOLE_MODEL}/versions/x", 422, "version"),
        (f"/ui/fragments/models/{CONSOLE_MODEL}/monitor?window=forever", 422, "window"),
        ("/ui/fragments/models/Bad_Name", 422, "model name"),
        ("/ui/fragments/sweeps/no-such-sweep", 404, "no-such-sweep"),
        ("/ui/static/../data.py", 404, ""),
        ("/ui/static/%2e%2e/data.py", 404, ""),
        ("/ui/static/vendor/README.md", 404, ""),
        ("/ui/static/a%00b.js", 404, "no console file"),
        ("/ui/static/" + "a" * 5000 + ".js", 404, "no console file"),
        ("/ui/fragments/models/x%00y", 422, "model name"),
        ("/ui/fragments/models/" + "a" * 5000, 422, 'Got "aaaa'),
        ("/ui/fragments/sweeps/a%00b", 422, "sweep_id"),
        ("/ui/fragments/sweeps/" + "s" * 5000, 422, "sweep_id"),
    ],
)
def test_bad_paths_get_a_4xx_naming_the_problem(console_url, console_keys, path, status, fragment):
    answer = get(console_url, path, console_keys["admin"])
    assert answer.status_code == status, answer.text
    assert fragment in answer.json()["error"]


def test_the_static_files_are_served_from_the_package(console_url):
    script = get(console_url, "/ui/static/vendor/chart.umd.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert len(script.content) > 100_000


def explain_body(row: list[float]) -> dict:
    return {"instance": row, "method": "integrated_gradients"}


def test_the_console_explains_a_row_as_the_explain_endpoint_does(
    console_url,
    console_keys,
    console_versions,
    digits_test_rows,  # noqa: F811
):
    _first, second = console_versions
    row = digits_test_rows[0][0].tolist()
    secret = console_keys["model"]
    headers = {"Authorization": f"Bearer {secret}"}
    answer = httpx.post(
        f"{console_url}/ui/api/models/{CONSOLE_MODEL}/versions/{second.version}/explain",
        json=explain_body(row),
        headers=headers,
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    found = answer.json()
    reference = httpx.post(
        f"{console_url}/v1/models/{CONSOLE_MODEL}:explain",
        json={"instances": [row], "method": "integrated_gradients"},
        headers=headers,
        timeout=120,
    ).json()
    expected = reference["explanations"][0]["attributions"]
    assert found["prediction"] == reference["predictions"][0]
    top = int(max(range(len(expected)), key=lambda i: abs(expected[i])))
    assert found["inputs"][0] == reference["inputs"][top]
    assert found["attributions"][0] == pytest.approx(expected[top], rel=1e-4, abs=1e-6)


def test_the_console_explains_a_version_that_is_not_served(
    console_url, console_keys, console_versions
):
    first, _second = console_versions  # @2 is served; @1 is explained on the console's thread
    answer = httpx.post(
        f"{console_url}/ui/api/models/{CONSOLE_MODEL}/versions/{first.version}/explain",
        json={"row": 0, "method": "feature_ablation"},
        headers={"Authorization": f"Bearer {console_keys['admin']}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["method"] == "feature_ablation" and len(answer.json()["inputs"]) == 20


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"method": "integrated_gradients"}, "either row"),
        ({"row": 0, "instance": [0.0] * 64}, "either row"),
        ({"instance": [0.0] * 3}, "takes 64"),
        ({"row": 10_000}, "stored sample has"),
        ({"row": 0, "method": "lime"}, "method"),
        ({"row": 0, "n_steps": 10_000}, "n_steps"),
        ({"instance": [1e38] * 64}, "overflow"),
    ],
)
@pytest.mark.parametrize("version", [1, 2])  # explained on the console's thread, and served
def test_a_bad_explain_request_is_a_422(
    console_url, console_keys, console_versions, body, fragment, version
):
    answer = httpx.post(
        f"{console_url}/ui/api/models/{CONSOLE_MODEL}/versions/{version}/explain",
        json=body,
        headers={"Authorization": f"Bearer {console_keys['admin']}"},
        timeout=60,
    )
    assert answer.status_code == 422, answer.text
    assert fragment in answer.json()["error"]
