"""aird's built-in plugins. Each module here is listed under the ``aird`` entry-point group in
pyproject.toml and registers itself through the same hooks a third-party package uses."""
