"""medprobe: what general-purpose vision-language models know about medical images."""

__version__ = "0.1.0"
