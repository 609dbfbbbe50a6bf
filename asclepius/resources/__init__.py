"""Fictional sample data shipped with the package (see README.md here): the embedded default's input."""
