"""Command-line entry points: ``maskrcnn-train`` (:mod:`.train_net`), ``maskrcnn-test`` (:mod:`.test_net`),
``maskrcnn-infer`` (:mod:`.infer`), ``maskrcnn-export`` (:mod:`.export`), ``maskrcnn-convert``
(:mod:`.convert_weights`) and ``maskrcnn-plot`` (:mod:`.plot`), each a ``main(argv=None) -> int``; ``tools/*.py`` are
shims over them.

Submodules are imported on use, never here: one command must not pay for the others' imports.
"""
import os

# Before torch loads OpenMP (the entry points import torch only after this package): idle OpenMP threads sleep
# instead of spinning. On a CPU shared with other processes, spinning threads wait for descheduled siblings at every
# parallel region (measured on 2 cores: 6-17 s/iteration instead of 0.45 s). OMP_WAIT_POLICY=ACTIVE brings it back.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Installed command -> module whose ``main(argv=None) -> int`` it runs (the same table as pyproject.toml's scripts).
COMMANDS = {
    "maskrcnn-train": "maskrcnn.cli.train_net",
    "maskrcnn-test": "maskrcnn.cli.test_net",
    "maskrcnn-infer": "maskrcnn.cli.infer",
    "maskrcnn-export": "maskrcnn.cli.export",
    "maskrcnn-convert": "maskrcnn.cli.convert_weights",
    "maskrcnn-plot": "maskrcnn.cli.plot",
}


def run(command: str, argv=None) -> int:
    """Run an installed command in this process, e.g. ``run("maskrcnn-test", ["--cfg", ...])``; returns its exit code.

    The ``maskrcnn-`` prefix may be left out. The command's module is imported only now.
    """
    import importlib

    name = command if command.startswith("maskrcnn-") else f"maskrcnn-{command}"
    if name not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; the commands are {sorted(COMMANDS)}")
    return importlib.import_module(COMMANDS[name]).main(argv)


__all__ = ["COMMANDS", "run"]
