"""The built-in component plugins: a folder per group, a module per plugin.

They register through the same entry-point group as third-party plugins.
"""
