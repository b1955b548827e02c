"""Engines that Synapse starts and watches itself: a child process per managed backend."""
