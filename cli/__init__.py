"""The `neoserve` command: the composition root that starts the three processes.

It is the one package that imports more than one process package (the launcher from `gateway/`, the engine's
config from `gpu_worker/`), so it sits beside them instead of inside the shared library `neoserve/`, which imports
no process package. `cli/main.py` holds the command; `python -m cli` runs it as the `neoserve` script does.
"""
