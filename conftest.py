"""pytest's hooks for the tests of this folder."""


def pytest_collection_finish(session):
    """Before the first test runs, each collected test module with a start_ahead(items) starts what its tests will wait
    for: test_triton.py its offline kernel builds, which then run on the core the rest of the suite leaves idle."""
    if session.config.option.collectonly:
        return
    for module in {item.module for item in session.items if hasattr(item.module, "start_ahead")}:
        module.start_ahead(session.items)
