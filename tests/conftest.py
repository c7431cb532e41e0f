"""Test configuration: real servers (devservers) and real demo models, as pytest plugins."""

pytest_plugins = ["tests.plugin_servers", "tests.plugin_models"]
