"""The OpenAPI document is valid OpenAPI 3 and lists every route the app serves."""

from openapi_spec_validator import validate

from tgi_router.app import Router, build_app
from tgi_router.http.openapi import openapi_document
from tgi_router.validation import ValidationConfig

UNDOCUMENTED = {"/api-doc/openapi.json", "/docs", "/docs/assets/{name}"}


def test_document_is_valid_openapi_3():
    validate(openapi_document("0.1.0"))


def test_every_served_route_is_documented_with_its_methods():
    config = ValidationConfig(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=8,
                              max_total_tokens=16)
    app = build_app(Router(engine=None, tokenizer=None, validation=config, info={}, max_concurrent_requests=1))
    paths = openapi_document("0.1.0")["paths"]
    for route in app.router.routes():
        path = route.resource.canonical
        if path in UNDOCUMENTED or route.method in ("HEAD", "OPTIONS"):
            continue
        assert route.method.lower() in paths.get(path, {}), f"{route.method} {path} is not documented"


def test_every_request_and_response_has_a_schema():
    for path, methods in openapi_document("0.1.0")["paths"].items():
        for method, operation in methods.items():
            if method == "post":
                assert operation["requestBody"]["content"]["application/json"]["schema"], path
            assert operation["responses"]["200"], path
