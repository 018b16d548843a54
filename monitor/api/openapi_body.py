"""Request-body schemas for routes that read their JSON body themselves (to bound its size first).

Pydantic writes nested models as ``{"$ref": "#/$defs/Name"}`` with the ``$defs`` inside the
model's schema. Inside an OpenAPI document ``#`` is the document's root, where no ``$defs``
exist, so such a reference dangles and schema-driven clients drop the body altogether; the
definitions are therefore inlined (the protocol's documents are not recursive).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_DEFS_PREFIX = "#/$defs/"


def _inline(node: Any, definitions: dict[str, Any], expanding: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions, expanding) for item in node]
    if not isinstance(node, dict):
        return node
    reference = node.get("$ref")
    if isinstance(reference, str) and reference.startswith(_DEFS_PREFIX):
        name = reference[len(_DEFS_PREFIX) :]
        if name in expanding:
            raise ValueError(f"recursive model {name!r} cannot be inlined")
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return {
            **_inline(definitions[name], definitions, (*expanding, name)),
            **_inline(siblings, definitions, expanding),
        }
    return {key: _inline(value, definitions, expanding) for key, value in node.items()}


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required ``application/json`` body of ``model``, self-contained."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _inline(schema, definitions, ())}}}
    }
