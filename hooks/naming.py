"""Names of parameters and modules that do not depend on how the model was wrapped (standard library only)."""

from __future__ import annotations

# torch.compile wraps a module as ``_orig_mod``; names must not depend on it.
COMPILE_WRAPPER = "_orig_mod"


def tensor_name(name: str) -> str:
    """A parameter's (or module's) name with every compile wrapper component removed."""
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER)
