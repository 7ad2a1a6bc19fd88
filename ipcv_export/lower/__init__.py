"""Lowering of a (rewritten) ExportedProgram to deployable files."""
