"""Keeps the suite's disk use to what one module needs at a time.

A full run writes several GB of checkpoints, exported models and datasets. Folders of passing tests go as each test
ends (``tmp_path_retention_policy = failed`` in ``setup.cfg``); the folders that module-scoped fixtures make with
``tmp_path_factory`` go here, when their module ends. A module with a failing test keeps its folders to look at.
"""

import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def _remove_module_folders(request, tmp_path_factory):
    """Removes the folders made under the session's base folder while this module ran, if all its tests passed."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed != failed_before:
        return
    for folder in set(base.iterdir()) - before:
        shutil.rmtree(folder, ignore_errors=True)
