"""Thin I/O layers around the core: capture files, queues, kernel set-up."""
