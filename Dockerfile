FROM python:3.11-slim
WORKDIR /app
# The wheel carries the bundled rules with their seeds and fixtures (setup.py), so the service needs no
# clone at run time; mount or bake in another rules folder and point NUDGES_RULES at it to serve your own.
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY nudges ./nudges
COPY rules ./rules
COPY seeds ./seeds
COPY fhir_fixtures ./fhir_fixtures
RUN pip install --no-cache-dir . && rm -rf /app/nudges /app/rules /app/seeds /app/fhir_fixtures
ENV NUDGES_HOST=0.0.0.0
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
CMD ["nudges", "serve"]
