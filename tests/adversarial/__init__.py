"""Hostile inputs that every change must keep rejecting cleanly."""
