"""nudges: health-equity decision support served over CDS Hooks."""

__version__ = "0.2.0"
