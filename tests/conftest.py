"""Keeps the suite's disk use to what one module needs at a time, and every test's signal handling as it found it.

A full run writes several GB of checkpoints, exported models and datasets. Folders of passing tests go as each test
ends (``tmp_path_retention_policy = failed`` in ``setup.cfg``); the folders that module-scoped fixtures make with
``tmp_path_factory`` go here, when their module ends. A module with a failing test keeps its folders to look at.
"""

import shutil

import pytest

from maskrcnn.deploy.signal_stack import current_signal_stack


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


@pytest.fixture(autouse=True)
def _signal_stack_kept():
    """Fails a test that leaves the main thread another alternate signal stack than it found (OpenVINO sets
    its own, later freed: the next signal then kills the whole run, see maskrcnn/deploy/signal_stack.py)."""
    before = current_signal_stack()
    yield
    after = current_signal_stack()
    assert after == before, f"the thread's alternate signal stack changed from {before} to {after}"
