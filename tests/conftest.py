pytest_plugins = ["stanchion.testing.pytest_plugin"]
