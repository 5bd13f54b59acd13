"""Shared pieces at the bottom of the import graph: atomic file writes, errors, registries, work-folder
paths, JSON serialization of dataclasses, worker pools. Owns no stage's files; every other subpackage may
import it, it imports none of them.
"""
