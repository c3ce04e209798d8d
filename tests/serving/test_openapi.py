"""The OpenAPI document describes every route's request and response (no Ray needed)."""

import json

from kiln.serving import v2
from kiln.serving.app import api


def test_every_v1_and_v2_route_has_a_response_schema():
    spec = api.openapi()
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            content = operation["responses"].get("200", {}).get("content", {})
            if not content.get("application/json", {}).get("schema"):
                missing.append(f"{method.upper()} {path}")
    assert missing == [], missing
    assert {"/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(
        spec["paths"]
    )


def test_v2_infer_documents_json_and_binary_bodies_without_dangling_refs():
    operation = api.openapi()["paths"]["/v2/models/{name}/infer"]["post"]
    body = operation["requestBody"]["content"]
    request = body["application/json"]["schema"]
    assert "$defs" not in json.dumps(request) and "$ref" not in json.dumps(request)
    tensor = request["properties"]["inputs"]["items"]
    assert {"name", "shape", "datatype", "data", "parameters"} <= set(tensor["properties"])
    # The documented input datatypes are exactly the ones the V2 parser accepts.
    assert set(tensor["properties"]["datatype"]["enum"]) == set(v2.INPUT_DATATYPES)
    assert "application/octet-stream" in body
    response = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert response["$ref"].endswith("/V2InferResponse")
    assert {"400", "404", "413", "422"} <= set(operation["responses"])
