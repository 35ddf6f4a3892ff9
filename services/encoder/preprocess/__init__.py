"""ImageBind's input transforms, reimplemented with PIL, numpy, soundfile and PyAV (no torchvision/torchaudio).

Each function turns the bytes of one file into the tensor the model takes, or raises ``MediaError``.
"""

from services.contracts.errors import InvalidRequestError


class MediaError(InvalidRequestError):
    """A file that cannot be decoded or is outside the limits; the message names the file."""
