"""Command-line entry points: ``maskrcnn-train`` (:mod:`.train_net`), ``maskrcnn-test`` (:mod:`.test_net`),
``maskrcnn-infer`` (:mod:`.infer`), ``maskrcnn-export`` (:mod:`.export`) and ``maskrcnn-convert``
(:mod:`.convert_weights`), each a ``main(argv=None) -> int``; ``tools/*.py`` are shims over them.

Submodules are imported on use, never here: one command must not pay for the others' imports.
"""
import os

# Before torch loads OpenMP (the entry points import torch only after this package): idle OpenMP threads sleep
# instead of spinning. On a CPU shared with other processes, spinning threads wait for descheduled siblings at every
# parallel region (measured on 2 cores: 6-17 s/iteration instead of 0.45 s). OMP_WAIT_POLICY=ACTIVE brings it back.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__: list = []  # no names of its own: each command is its submodule's main()
