"""The typed configuration: dataclasses are the schema (schema), YAML holds values (loading), checks run before
anything loads (checks). Imports nothing else from ldm."""
