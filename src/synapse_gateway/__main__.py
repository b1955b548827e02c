"""`python -m synapse_gateway` is the `synapse` command."""

from .cli import main

main()
