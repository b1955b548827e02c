"""Lifecycle drivers: how each kind of backend is woken, put to sleep and asked whether it is resident."""
