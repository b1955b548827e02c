"""Forwarding one API request: admission, the attempt loop across deployments, and relaying the answer."""
