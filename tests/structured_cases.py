"""The JSON schema the structured-output tests (local and server backends) ask for: bounded, so a valid answer
fits a small max_new_tokens, and every kind of constraint (bounded string, enum, bounded integer, boolean)."""

import json

SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 24},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "count": {"type": "integer", "minimum": 2, "maximum": 7},
        "nsfw": {"type": "boolean"},
    },
    "required": ["caption", "mood", "count", "nsfw"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)
