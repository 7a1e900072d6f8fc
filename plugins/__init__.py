"""The algorithm plugins shipped with metaopt (importable as ``metaopt.plugins``)."""
