"""``python -m diffuse_engine`` is the ``diffuse`` command."""

from diffuse_engine.cli import main

if __name__ == "__main__":
    main()
