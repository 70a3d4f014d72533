"""Repository-level pytest settings."""

# The plugin template's tests run against a fresh install of the template, made by
# tests/test_plugin_template.py; collecting them here would need the template installed.
collect_ignore = ["contrib/plugin-template"]
