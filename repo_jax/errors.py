"""The error every checkpoint reader raises (its own module so that the readers of
config.json, config.yaml and pe_config can share it without importing each other)."""


class FormatError(ValueError):
    """A checkpoint or its config cannot be read; the message says where and how to fix it."""
