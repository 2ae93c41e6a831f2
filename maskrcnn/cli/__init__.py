"""Console-script entry points; ``tools/*.py`` are thin shims over them. Each module has ``main(argv=None) -> int``."""

__all__: list = []
