"""Vivace: an ML serving engine with a native core.

Subpackages: `vivace.engine` (serving, Scorer, CLI), `vivace.registry`, `vivace.features`,
`vivace.monitor`, `vivace.bench`; the compiled core is `vivace._core`. The repository keeps
each subpackage in its own top-level folder (engine/, registry/, ...); this folder is only
the package root.
"""

__version__ = "0.1.0"
