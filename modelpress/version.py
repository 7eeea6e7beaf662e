"""The package version, in a leaf module: files that record it import nothing else of modelpress."""
__version__ = "0.1.0"
