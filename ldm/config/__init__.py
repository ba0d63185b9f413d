"""The typed configuration: dataclasses are the schema (schema, with its model, data and kinds sections), YAML
holds values (loading), checks run before anything loads (checks), and the reference page is generated from the
schema (reference). Imports nothing else from ldm but the errors."""
