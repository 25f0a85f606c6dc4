"""Built-in plugins of diffuse-engine, installed as ``diffuse_plugins``.

Each module is one plugin, registered through the ``diffuse_engine.plugins`` entry
point group exactly like a third-party package; the core never imports them by name.
"""
