"""The foundation: errors, hook specs, the plugin manager and catalogue, the registry,
trust rules for registry imports, devices and the process group.

Nothing here imports from the layers above (components, services, the engine, the CLI).
"""
