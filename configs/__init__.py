"""routezoo.configs: ``get_config()`` files, one per experiment.

``base.py`` holds the full schema with defaults; every other file starts from it and
documents its command, expected time and result in its docstring.
"""
