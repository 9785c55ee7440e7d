def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interop_matrix: real instrumentation libraries (own venvs, npm) against a running appliance; "
                   "minutes, not in the default run (make test-interop-matrix)")
