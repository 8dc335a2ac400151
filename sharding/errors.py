"""The two kinds of failure the shard tool knows: a whole run refused, or one image skipped."""


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
