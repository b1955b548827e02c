"""The default local stack: models shipped in installed wheels, served by local engines."""
