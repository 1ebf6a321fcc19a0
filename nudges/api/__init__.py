"""HTTP edge: FastAPI app, spec-named pydantic models, error mapping."""
