"""Reading a multipart body with Starlette's bounds, its errors in the shared shape.

Inside an app, Starlette turns its parser's errors (``MultiPartException``) into a bare 400 ``HTTPException``
that keeps only the message: in the shared shape that read code "invalid_request_error" with no param, and an
``except MultiPartException`` around ``request.form()`` never ran."""

from __future__ import annotations

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from services.contracts.errors import InvalidRequestError, NextGPTError


async def read_form(request: Request, *, max_files: int, max_fields: int, setting: str,
                    too_many: type[NextGPTError] = InvalidRequestError) -> FormData:
    """``request.form()`` bounded by ``max_files`` and ``max_fields``. More files than ``max_files``: ``too_many``
    with code ``too_many_files`` naming ``setting`` (the bound's environment variable); any other fault of the body:
    400 ``invalid_multipart``. Both name the param ``files``."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, HTTPException) as exc:
        message = exc.message if isinstance(exc, MultiPartException) else str(exc.detail)
        if message.startswith("Too many files"):  # Starlette's words: it gives no other sign of which bound
            raise too_many(f"more than {max_files} files ({setting})", code="too_many_files",
                           param="files") from exc
        raise InvalidRequestError(f"bad multipart body: {message}", code="invalid_multipart",
                                  param="files") from exc
