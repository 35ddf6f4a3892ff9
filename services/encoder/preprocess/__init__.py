"""ImageBind's input transforms, reimplemented with PIL, numpy, soundfile and PyAV (no torchvision/torchaudio).

Each function turns the bytes of one file into the tensor the model takes, or raises ``MediaError``.
"""

from services.contracts.errors import InvalidRequestError


class MediaError(InvalidRequestError):
    """A file that cannot be decoded or is outside the limits; the message names the file."""


def reason(exc: BaseException) -> str:
    """What a decoding library said was wrong with a file, without what it says about our side of the call: PIL
    and libsndfile name the in-memory buffer (``<_io.BytesIO object at 0x...>``), FFmpeg errors carry an errno and
    the name of the file it was not given (``'<none>'``)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "no picture format recognised in its bytes"
    for attribute in ("error_string", "strerror"):  # libsndfile's own words; FFmpeg's without errno and file name
        said = getattr(exc, attribute, None)
        if isinstance(said, str) and said:
            return said
    return str(exc)
