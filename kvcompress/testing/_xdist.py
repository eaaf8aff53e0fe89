"""pytest-xdist support of the kvcompress plugin (being written: issue 12 item 6)."""


def install(config) -> None:
    """Register the xdist hooks of the kvcompress plugin on ``config``."""
