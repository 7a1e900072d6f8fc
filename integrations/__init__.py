"""Bridges to timm and accelerate (importable as ``metaopt.integrations``)."""
