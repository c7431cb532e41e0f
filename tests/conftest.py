"""Test configuration: real servers (devservers), real demo models and certificates, as pytest plugins."""

pytest_plugins = ["tests.plugin_servers", "tests.plugin_models", "tests.plugin_pki"]
