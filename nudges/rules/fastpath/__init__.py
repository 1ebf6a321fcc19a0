"""Compiled FHIRPath: the catalog's expressions as Python closures, fhirpathpy's results exactly."""

from .translate import SUPPORTED_FUNCTIONS, compile_fast

__all__ = ["SUPPORTED_FUNCTIONS", "compile_fast"]
