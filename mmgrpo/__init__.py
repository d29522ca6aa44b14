"""mmgrpo: group-relative policy optimisation for image/video generators and vision-language models."""

__version__ = "0.1.0"
