from .broken_syntax import NODE_CLASS_MAPPINGS  # noqa: F401
