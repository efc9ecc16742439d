"""Arrow schemas of the outputs, and their validation."""

from schemas.captions import CANDIDATE_TYPE, SchemaError, captions_schema, validate_table

__all__ = ["CANDIDATE_TYPE", "SchemaError", "captions_schema", "validate_table"]
