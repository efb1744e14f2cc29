"""Executing a notebook with papermill as clipstudy does everywhere (the sweep's cells and the report)."""

from __future__ import annotations

import os
from pathlib import Path

from clipstudy import paths


def local_socket_kernel_manager(folder: str):
    """A Jupyter kernel manager whose kernel talks over Unix sockets in ``folder``.

    The default TCP transport picks free ports by probing, which parallel cells
    (``--jobs N``) can race for, and makes every kernel log an "unencrypted TCP"
    warning; sockets in a private folder avoid both.
    """
    from jupyter_client import AsyncKernelManager

    class LocalSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=os.path.join(folder, "kernel"), **kwargs)

    return LocalSocketKernelManager


def execute_notebook(notebook: Path, output: Path, parameters: dict, **kwargs) -> None:
    """Run ``notebook`` with papermill into ``output`` as clipstudy does everywhere.

    The kernel runs from the project root (the output's folder for an installed
    clipstudy; no path depends on it) and talks over Unix sockets in a
    private temporary folder (:func:`local_socket_kernel_manager`); other keyword
    arguments go to ``papermill.execute_notebook``.
    """
    import shutil
    import tempfile

    import papermill

    # a short path: a Unix socket's name is limited to ~100 characters, run folders may be deeper
    sockets = tempfile.mkdtemp(prefix="clipstudy-kernel-")
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=parameters,
            kernel_name="python3",
            progress_bar=False,
            cwd=str(_kernel_directory(output)),
            kernel_manager_class=local_socket_kernel_manager(sockets),
            **kwargs,
        )
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _kernel_directory(output: Path) -> Path:
    root = paths.checkout_root()
    return root if root is not None else Path(output).resolve().parent
