"""Method plugins, one file each. Every module here is imported by the registry (harness.plugin.method.METHODS)."""
