"""The input check of the model endpoint: the version's signature, as a 422 that names
the column (or dimension) and what the model expects."""

from __future__ import annotations

from typing import Any

from keel.errors import SignatureError
from keel.serving.protocol import ProtocolError
from keel.tracking.models import LoadedModel
from keel.tracking.signature import Signature, compatible


def checked(model: LoadedModel, data: Any) -> Any:
    """`data` as the model takes it, or a 422 saying what does not match."""
    try:
        return model.check_input(data)
    except SignatureError as exc:
        sig = model.signature
        details: dict[str, Any] = {"signature": sig.to_dict() if sig else None}
        message = exc.message
        if sig is not None and sig.columns is not None:
            mismatched = _columns(sig, data)
            details["columns"] = mismatched
            missing = [c for c in mismatched if c["got"] is None]
            if missing:  # the signature check names them; add the type each should have
                wanted = ", ".join(
                    f"{c['name']!r} ({c['expected'] or 'any type'})" for c in missing
                )
                message = f"{message}; missing: {wanted}"
        raise ProtocolError(422, "SIGNATURE_MISMATCH", message, details) from None


def _columns(sig: Signature, data: Any) -> list[dict[str, Any]]:
    """Each expected column that is missing or of a type the model does not take."""
    present = {str(c): str(data[c].dtype) for c in getattr(data, "columns", ())}
    out = []
    for col in sig.columns or ():
        got = present.get(col.name)
        if got is None or (col.dtype is not None and not compatible(col.dtype, got)):
            out.append({"name": col.name, "expected": col.dtype, "got": got})
    return out
