"""Requests -> runner -> sampler -> outputs."""
