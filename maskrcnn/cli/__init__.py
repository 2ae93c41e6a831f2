"""Console-script entry points (``maskrcnn-*``); ``tools/*.py`` are shims over them. Each module has
``main(argv=None) -> int``; nothing is imported here so that one command does not load the others."""

__all__: list = []
