"""The two kinds of failure the shard tool knows: a whole run refused, or one image skipped."""

import re


class RunError(Exception):
    """A run-level problem (bad option, missing column, unwritable OUTPUT, empty source).

    Raised before any expensive work starts; the CLI prints it as one line and exits non-zero.
    The message must name the thing the user has to fix.
    """


class ImageError(Exception):
    """An image-level problem (corrupt, truncated, not an image, undecodable DICOM, missing file).

    The image is skipped and recorded in the manifest's `skipped` list with str(error) as the reason;
    the run goes on.
    """


_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>|\s+at 0x[0-9a-fA-F]+\b")


def strip_addresses(text: str) -> str:
    """Cut memory addresses ("<... object at 0x7f...>", "at 0x7f...") out of a message."""
    return _ADDRESS.sub("", text).strip()


def exception_reason(exc: BaseException, limit: int = 120) -> str:
    """One short, reproducible line from an exception for a skip reason.

    Decoders put object reprs in their messages (Pillow: "cannot identify image file
    <_io.BytesIO object at 0x7f...>"); the address differs on every run and would make manifest.json
    differ between two runs of the same build, so it is cut out.
    """
    lines = str(exc).strip().splitlines()
    text = strip_addresses(lines[0] if lines else "") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
