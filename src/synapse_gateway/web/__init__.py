"""The HTTP layer both apps (gateway and audio engine) share: error rendering, request ids, serving."""
