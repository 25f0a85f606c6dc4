"""The sampling service: sharded, seeded sampling with built components; locating NaN.

Takes components and settings as arguments; never imports the :class:`Engine`.
"""
