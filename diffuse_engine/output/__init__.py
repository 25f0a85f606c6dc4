"""Foundation for what runs leave on disk and on screen: atomic files and run folders,
plots, image grids, progress bars and signal handling. Used by every service; imports
nothing from the layers above.
"""
