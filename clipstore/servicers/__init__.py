"""Thin servicers: parse and check the request, call the domain, return protos."""
