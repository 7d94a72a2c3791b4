"""Building the schemas from the models (imported only when a schema is generated)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from worker.schemas import ENV_REFERENCE_PATTERN

__all__ = ["build"]


class _MessageSchema(GenerateJsonSchema):
    """The published JSON: fields with defaults are still always present, so they are required."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        # left out of the JSON when None (StatusMessage.reason, ...): optional
        return not field.get("serialization_exclude") and "serialization_exclude_if" not in field


class _PipelineFileSchema(GenerateJsonSchema):
    """Input schema of a pipeline file, with ``${VAR}`` references allowed where values are typed."""

    @staticmethod
    def _or_reference(schema: JsonSchemaValue) -> JsonSchemaValue:
        reference = {
            "type": "string",
            "pattern": ENV_REFERENCE_PATTERN,
            "description": "replaced from the environment when the file is loaded",
        }
        return {"anyOf": [schema, reference]}

    def int_schema(self, schema: core_schema.IntSchema) -> JsonSchemaValue:
        return self._or_reference(super().int_schema(schema))

    def float_schema(self, schema: core_schema.FloatSchema) -> JsonSchemaValue:
        return self._or_reference(super().float_schema(schema))

    def bool_schema(self, schema: core_schema.BoolSchema) -> JsonSchemaValue:
        return self._or_reference(super().bool_schema(schema))

    def str_schema(self, schema: core_schema.StringSchema) -> JsonSchemaValue:
        generated = super().str_schema(schema)
        constrained = {"pattern", "minLength", "maxLength", "format"} & set(generated)
        return self._or_reference(generated) if constrained else generated

    def literal_schema(self, schema: core_schema.LiteralSchema) -> JsonSchemaValue:
        generated = super().literal_schema(schema)
        # a single value is a discriminator (``type: video``): keep it exact so one variant matches
        return self._or_reference(generated) if len(schema["expected"]) > 1 else generated


def _message_target(kind: str) -> Any:
    from worker import messages

    return {
        "result": messages.FrameResult,
        "error": messages.ErrorReport,
        "status": messages.StatusMessage,
        "control": messages.ControlMessage,
        "control-result": messages.ControlReply,
    }[kind]


def build(kind: str) -> dict[str, Any]:
    """The schema body of ``kind`` (without ``$schema``/``title``)."""
    if kind == "pipeline":
        from worker.config import PipelineConfig

        return PipelineConfig.model_json_schema(mode="validation", schema_generator=_PipelineFileSchema)
    adapter: TypeAdapter[Any] = TypeAdapter(_message_target(kind))
    return adapter.json_schema(by_alias=True, mode="serialization", schema_generator=_MessageSchema)
