"""Shared by the commands that measure and report (bench, eval, loadtest): run records and result tables."""
